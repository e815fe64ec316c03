"""The fused decode step's CPU time in two source trees, interleaved: did a change to the C step cost anything?

    git worktree add /tmp/base <rev>   # the tree to compare against; build its fused step (make dev) there
    python -m bench.ab_step --base /tmp/base [--rounds 14]

Each round runs one fresh process per tree (alternating which goes first) that times the shipped checkpoint's
`FusedDecoder` (float16 weights and cache, no edits, one thread) for 40 steps from position 64 at batch 1 and 32, 7
times, and keeps the median CPU ms per step. Only public names are used (`FusedDecoder`, `auto_kv_dtype`, `KVCache`),
so trees with different C ABIs compare. Prints one JSON line: per tree the median over rounds, and head / base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, statistics, time, torch
torch.set_num_threads(1)
from model.checkpoint import load_checkpoint
from model.fast import FusedDecoder, auto_kv_dtype
from model.kv_cache import KVCache
model = load_checkpoint("model/checkpoints/shakespeare.safetensors").model.eval()
dec = FusedDecoder(model, weights="float16")
out = {}
for B in (1, 32):
    cache = KVCache(model.config, B, dtype=auto_kv_dtype(dec))
    tok = torch.zeros(B, dtype=torch.long)
    times = []
    with torch.inference_mode():
        for _ in range(7):
            c0 = time.process_time()
            for p in range(64, 104):
                dec(tok, cache, torch.full((B,), p))
            times.append((time.process_time() - c0) * 1e3 / 40)
    out[f"bs{B}"] = statistics.median(times)
print(json.dumps(out))
"""


def measure(tree: Path) -> dict[str, float]:
    """Median CPU ms per step at batch 1 and 32, one fresh process in `tree`."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the source tree to compare against")
    p.add_argument("--head", type=Path, default=HERE, help="the source tree under test (default: this one)")
    p.add_argument("--rounds", type=int, default=14)
    a = p.parse_args(argv)
    trees = {"base": a.base.resolve(), "head": a.head.resolve()}
    runs: dict[str, dict[str, list[float]]] = {name: {"bs1": [], "bs32": []} for name in trees}
    for r in range(a.rounds):
        for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
            for k, v in measure(trees[name]).items():
                runs[name][k].append(v)
    med = {name: {k: statistics.median(v) for k, v in per.items()} for name, per in runs.items()}
    result = {
        "ms_per_step_median": {name: {k: round(v, 4) for k, v in per.items()} for name, per in med.items()},
        "head_over_base": {k: round(med["head"][k] / med["base"][k], 3) for k in ("bs1", "bs32")},
        "runs": {name: {k: [round(x, 4) for x in v] for k, v in per.items()} for name, per in runs.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
