"""`python -m bench.ceiling`: what this machine allows the fused step, to read the issue #28 goals against.

Two measurements, neither of them our step:
- **gemv**: `bench/ceiling.c`, compiled here with the system C compiler (a bench tool, never built or needed by the
  server), times one pass over the shipped model's block weights (float16 and int8) three ways: a pure streaming read
  of the bytes (the bandwidth limit the batch-1 goal is a fraction of), and the ideal float16 and int8 GEMV inner
  loops of the fused step with nothing around them (no attention, LayerNorm, GELU, unembedding or row handling).
  The ideal loop's fraction of the read is the most any batch-1 step with these kernels can reach here.
- **scaling**: the fused step on one thread at batch 32 (float16 weights) in one process alone, then in two
  independent processes at once, each pinned to its own CPU where the affinity mask allows. Two processes share
  nothing but the machine (caches, memory bandwidth, the host's scheduling of the vCPUs), so their combined speed-up,
  2 x alone / together, is what two perfectly split threads could reach on this machine.

Prints one JSON object. The batch-1 step itself: `python -m bench.fused --threads 1 --batches 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.stats import median

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CFLAGS = ("-O3", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c")


def gemv(reps: int = 200, runs: int = 5) -> dict[str, Any]:
    """`bench/ceiling.c` compiled and run `runs` times; the median of each figure, and the ideal loops' fractions of
    the read limit."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return {"error": "no C compiler: the gemv ceiling is compiled from bench/ceiling.c"}
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "ceiling"
        subprocess.run([cc, *CFLAGS, str(HERE / "ceiling.c"), "-o", str(exe)], check=True, capture_output=True)
        outs = [
            json.loads(
                subprocess.run([str(exe), "3232512", str(reps)], check=True, capture_output=True, text=True).stdout
            )
            for _ in range(runs)
        ]
    keys = [k for k in outs[0] if k.endswith(("_ms", "_gb_s"))]
    res: dict[str, Any] = {k: median([o[k] for o in outs]) for k in keys}
    res["f16_max_err"] = max(o["f16_max_err"] for o in outs)  # against a scalar GEMV: the loops compute a GEMV
    res["int8_max_err"] = max(o["int8_max_err"] for o in outs)
    res["runs"] = runs
    res["f16_gemv_fraction_of_read"] = median([o["read_f16_bytes_ms"] / o["f16_gemv_ms"] for o in outs])
    res["int8_gemv_fraction_of_read"] = median([o["read_int8_bytes_ms"] / o["int8_gemv_ms"] for o in outs])
    return res


def _step_cmd(reps: int, rounds: int, checkpoint: Path | None = None) -> list[str]:
    ck = ["--checkpoint", str(checkpoint), "--position", "1"] if checkpoint else []
    return [
        sys.executable,
        "-m",
        "bench.fused",
        "--threads",
        "1",
        "--batches",
        "32",
        "--weights",
        "float16",
        "--reps",
        str(reps),
        "--rounds",
        str(rounds),
        *ck,
    ]


def _wall_ms(out: str) -> float:
    return float(json.loads(out)["float16_bs32"]["threads1"]["wall_ms"])


def scaling(reps: int = 20, rounds: int = 5, trials: int = 3, checkpoint: Path | None = None) -> dict[str, Any]:
    """The one-thread batch-32 step alone, then in two processes at once (each pinned to a CPU of its own, the one
    alone to the first of them, where the affinity mask allows), `trials` times interleaved; wall ms per step of
    each, and the two processes' combined speed-up over one. `checkpoint`: the model to step (default the shipped
    one)."""
    cpus = sorted(os.sched_getaffinity(0))
    alone: list[float] = []
    together: list[float] = []
    for _ in range(trials):
        one = subprocess.run(
            _step_cmd(reps, rounds, checkpoint),
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpus[0]})) if len(cpus) > 1 else None,
        )
        alone.append(_wall_ms(one.stdout))
        procs = []
        for i in range(2):
            pin = {cpus[i % len(cpus)]}
            procs.append(
                subprocess.Popen(
                    _step_cmd(reps, rounds, checkpoint),
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    text=True,
                    preexec_fn=(lambda pin=pin: os.sched_setaffinity(0, pin)) if len(cpus) > 1 else None,
                )
            )
        together.extend(_wall_ms(p.communicate(timeout=600)[0]) for p in procs)
    a, t = median(alone), median(together)
    return {
        "cpus": len(cpus),
        "alone_wall_ms": a,
        "together_wall_ms": t,
        "alone_runs": alone,
        "together_runs": together,
        "two_process_speedup": 2 * a / t,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="gemv,scaling", help="comma list out of gemv,scaling")
    p.add_argument("--trials", type=int, default=3, help="scaling: alone/together pairs")
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    out: dict[str, Any] = {}
    if "gemv" in parts:
        out["gemv"] = gemv()
    if "scaling" in parts:
        out["scaling"] = scaling(trials=a.trials)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
