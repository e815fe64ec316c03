"""`python -m bench.fused`: what each part of the fused C step buys, in CPU ms (medians of interleaved rounds, one
thread): the prefill through its kernels against the torch forward, and a step per build (AVX2, AVX-512 where the CPU
runs it) and cache dtype at several batch sizes and positions. Prints one JSON object.

`python -m bench.fused --threads 1,2` instead times the step of the installed build on 1 and 2 threads (and
`--weights float16,int8`): wall and CPU ms per step at each batch (`step_threads`), and each thread count's wall
speed-up over one thread (the issue #28 goal: >= 1.7x at batch 32 on 2 threads). Also the `step_threads` section of
`python -m bench.run`. `--weights int8-pairs,int8` on a CPU with AVX512_VNNI: the AVX2 int8 kernel against the VNNI
one (`int8` runs the build's fastest, `int8_layout` in the output says which)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.stats import median
from model.checkpoint import load_checkpoint
from model.fast import FusedDecoder, build, cpu_supported
from model.kv_cache import KVCache
from model.transformer import Transformer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "model" / "checkpoints" / "shakespeare.safetensors"


def cpu_ms(fns: dict[str, Callable[[], object]], reps: int, rounds: int) -> dict[str, float]:
    """Median CPU ms per call of each function, one run of `reps` calls of each per round (after one warm-up call)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.process_time()
            for _ in range(reps):
                fn()
            times[name].append(1e3 * (time.process_time() - t0) / reps)
    return {k: median(v) for k, v in times.items()}


def libraries(folder: Path) -> dict[str, Path]:
    """Both builds from source into `folder`, those this CPU runs."""
    out = {}
    for isa in ("avx2", "avx512"):
        if cpu_supported(isa) and (lib := build(folder / f"fused_{isa}.so", isa=isa)) is not None:
            out[isa] = lib
    return out


def run(
    model: Transformer, prompt_tokens: int, batches: tuple[int, ...], positions: tuple[int, ...], reps: int, rounds: int
) -> dict[str, Any]:
    cfg = model.config
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        decs = {isa: FusedDecoder(model, weights="float16", library=lib) for isa, lib in libraries(Path(tmp)).items()}
        if not decs:
            raise SystemExit("no fused build here (no C compiler, or a CPU without AVX2/FMA/F16C)")
        isa = "avx512" if "avx512" in decs else "avx2"
        prompt = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
        one = KVCache(cfg, 1, dtype=torch.float16)
        zero = torch.zeros(1, dtype=torch.long)
        out["prefill_ms"] = cpu_ms(
            {
                f"fused_{isa}": lambda: decs[isa].prefill(prompt, one),
                "torch_forward": lambda: model(prompt[None], cache=one, pos=zero, last_only=True),
            },
            reps,
            rounds,
        )
        for B in batches:
            caches = {dt: KVCache(cfg, B, dtype=dt) for dt in (torch.float32, torch.float16)}
            for c in caches.values():
                c.k.normal_(generator=torch.Generator().manual_seed(1))
                c.v.normal_(generator=torch.Generator().manual_seed(2))
            tok = torch.zeros(B, dtype=torch.long)
            for p in positions:
                pos = torch.full((B,), p)
                fns = {
                    f"{name}_{str(dt).removeprefix('torch.')}": (lambda d=d, c=c, tok=tok, pos=pos: d(tok, c, pos))
                    for name, d in decs.items()
                    for dt, c in caches.items()
                }
                out[f"step_bs{B}_pos{p}_ms"] = cpu_ms(fns, max(1, reps * 4 // B), rounds)
    return out


def wall_cpu_ms(fns: dict[str, Callable[[], object]], reps: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU ms per call of each function (all threads' CPU), interleaved rounds of `reps` calls."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                fn()
            wall[name].append(1e3 * (time.perf_counter() - w0) / reps)
            cpu[name].append(1e3 * (time.process_time() - c0) / reps)
    return {k: {"wall_ms": round(median(wall[k]), 4), "cpu_ms": round(median(cpu[k]), 4)} for k in fns}


def _decoder(model: Transformer, weights: str, threads: int) -> FusedDecoder:
    """`int8-pairs`: int8 weights through the AVX2 kernel even where the build also runs the VNNI one."""
    if weights == "int8-pairs":
        return FusedDecoder(model, weights="int8", int8_layout="pairs", threads=threads)
    return FusedDecoder(model, weights=weights, threads=threads)


def step_threads(
    model: Transformer,
    threads: tuple[int, ...] = (1, 2),
    batches: tuple[int, ...] = (1, 32),
    weights: tuple[str, ...] = ("float16",),
    position: int = 64,
    reps: int = 40,
    rounds: int = 7,
) -> dict[str, Any]:
    """The installed fused step on each thread count: wall and CPU ms per step (float16 cache for float16 and int8
    weights, steps from `position`), and the wall speed-up over the first thread count, per batch and weights."""
    cfg = model.config
    out: dict[str, Any] = {"position": position, "rounds": rounds, "threads": list(threads)}
    with torch.inference_mode():
        decs = {(w, t): _decoder(model, w, t) for w in weights for t in threads}
        out["int8_layout"] = {w: decs[w, threads[0]].int8_layout for w in weights if w.startswith("int8")}
        for w in weights:
            for B in batches:
                kv = torch.float32 if w == "float32" else torch.float16
                caches = {t: KVCache(cfg, B, dtype=kv) for t in threads}
                tok, pos = torch.zeros(B, dtype=torch.long), torch.full((B,), position)
                fns = {
                    f"threads{t}": (lambda d=decs[w, t], c=caches[t], tok=tok, pos=pos: d(tok, c, pos)) for t in threads
                }
                res = wall_cpu_ms(fns, max(2, reps * 4 // B), rounds)
                base = res[f"threads{threads[0]}"]["wall_ms"]
                for t in threads:
                    res[f"threads{t}"]["wall_speedup"] = round(base / res[f"threads{t}"]["wall_ms"], 3)
                out[f"{w}_bs{B}"] = res
    for d in decs.values():
        d.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,4,32")
    p.add_argument("--positions", default="1,160")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", default="", help="e.g. 1,2: time the step on these thread counts instead")
    p.add_argument("--weights", default="float16", help="with --threads: float32,float16,int8,int8-pairs")
    p.add_argument("--position", type=int, default=64, help="with --threads: the steps' position")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_checkpoint(a.checkpoint).model.eval()
    if a.threads:
        res = step_threads(
            model,
            tuple(int(t) for t in a.threads.split(",")),
            tuple(int(b) for b in a.batches.split(",")),
            tuple(a.weights.split(",")),
            position=a.position,
            reps=a.reps,
            rounds=a.rounds,
        )
        json.dump(res, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    res = run(
        model,
        a.prompt_tokens,
        tuple(int(b) for b in a.batches.split(",")),
        tuple(int(x) for x in a.positions.split(",")),
        a.reps,
        a.rounds,
    )
    json.dump(res, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
