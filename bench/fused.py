"""`python -m bench.fused`: what each part of the fused C step buys, in CPU ms (medians of interleaved rounds, one
thread): the prefill through its kernels against the torch forward, and a step per build (AVX2, AVX-512 where the CPU
runs it) and cache dtype at several batch sizes and positions. Prints one JSON object."""

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,4,32")
    p.add_argument("--positions", default="1,160")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_checkpoint(a.checkpoint).model.eval()
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
