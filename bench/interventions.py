"""What interventions and the per-token trace cost: the decode step with each feature on and off (and the step
from before they existed), and the engine's batch throughput with the trace on every row or none."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.baseline_step import BaselineDecoder
from bench.stats import median
from model.decode import FastDecoder, auto_decode_weights
from model.diagnostics import stream_trace
from model.edits import Intervention, StreamEdits
from model.engine import Engine, FinishEvent, SamplingParams
from model.fast import FusedDecoder, auto_kv_dtype, fused_available, supports
from model.kv_cache import KVCache
from model.transformer import Transformer


def step_costs(
    model: Transformer, start: int, steps: int, batches: tuple[int, ...] = (1, 32), rounds: int = 9
) -> dict[str, Any]:
    """CPU ms per decode step of each variant, medians over `rounds` interleaved runs of `steps` steps.

    CPU time of this process (the step runs on the calling thread with one torch thread), not wall time: other
    processes taking the cores then inflate the figures far less.

    baseline: the step before interventions existed; none: today's step, no row intervened or traced (the
    common case); gates: every row intervened (identity gates, same work as any intervention); trace: every
    row traced, with the engine's per-token figures (`stream_trace`); trace_lens5: and logit_lens_top=5; add: every
    row steering (a vector added after every block, half the rows past their prompt); and, where the fused C step
    (`model.fast`) is built, fused_none / fused_gates / fused_trace / fused_add: the same with it.
    """
    fast = FastDecoder(model, weights=auto_decode_weights())  # as the engine runs it
    out: dict[str, Any] = {"weights": fast.weights, "scripted": fast.scripted, "steps": steps, "rounds": rounds}
    for B in batches:
        times = _interleaved(_step_variants(model, fast, B), start, steps, rounds, B)
        for name, t in times.items():
            out[f"bs{B}_{name}_ms"] = median(t)
            out[f"bs{B}_{name}_reps_ms"] = t
        base = out[f"bs{B}_baseline_ms"]
        for name in ("none", "gates", "trace", "trace_lens5", "add", "fused_none", "fused_gates", "fused_trace"):
            if f"bs{B}_{name}_ms" in out:
                out[f"bs{B}_{name}_throughput_vs_baseline"] = base / out[f"bs{B}_{name}_ms"]
        for steer, plain in (("add", "none"), ("fused_add", "fused_none")):  # every row steering vs none
            if f"bs{B}_{steer}_ms" in out:
                out[f"bs{B}_{steer}_vs_{plain}"] = out[f"bs{B}_{steer}_ms"] / out[f"bs{B}_{plain}_ms"]
    return out


def _step_variants(model: Transformer, fast: FastDecoder, B: int) -> dict[str, Callable[[torch.Tensor], None]]:
    """One decode step of B rows at positions `pos`, per variant (see `step_costs`)."""
    cfg = model.config
    cache = KVCache(cfg, B)
    tok = torch.zeros(B, dtype=torch.long)
    gates, rows = StreamEdits(torch.ones(B, cfg.n_layer, 2)), torch.arange(B)
    steer = StreamEdits(  # a vector after every block of every row; half the rows at generated positions
        None, 0.01 * torch.randn(B, cfg.n_layer, 2, cfg.d_model), torch.where(torch.arange(B) % 2 == 0, 0, 2**62)
    )
    old = BaselineDecoder(fast)

    def run_old(pos: torch.Tensor) -> None:
        old(tok, cache, pos)

    def run_new(pos: torch.Tensor, g: StreamEdits | None = None, r: torch.Tensor | None = None, lens: int = -1) -> None:
        res = fast(tok, cache, pos, g, r)
        if lens >= 0:
            stream_trace(model, res.stream, [lens] * B)

    variants = {
        "baseline": run_old,
        "none": run_new,
        "gates": lambda p: run_new(p, gates),
        "trace": lambda p: run_new(p, None, rows, 0),
        "trace_lens5": lambda p: run_new(p, None, rows, 5),
        "add": lambda p: run_new(p, steer),
    }
    if fused_available() and supports(cfg):
        fused = FusedDecoder(model, weights=fast.weights)
        fused_cache = KVCache(cfg, B, dtype=auto_kv_dtype(fused))  # as the engine gives it

        def run_fused(pos: torch.Tensor, g: StreamEdits | None = None, r: torch.Tensor | None = None) -> None:
            res = fused(tok, fused_cache, pos, g, r)
            if r is not None:
                stream_trace(model, res.stream, [0] * B)

        variants.update(
            {
                "fused_none": run_fused,
                "fused_gates": lambda p: run_fused(p, gates),
                "fused_trace": lambda p: run_fused(p, None, rows),
                "fused_add": lambda p: run_fused(p, steer),
            }
        )
    return variants


def _interleaved(
    variants: dict[str, Callable[[torch.Tensor], None]], start: int, steps: int, rounds: int, B: int
) -> dict[str, list[float]]:
    """CPU ms per step of each variant, one run of each per round, after a warm-up (TorchScript specialises)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            for i in range(3):
                fn(torch.full((B,), start + i))
        for _ in range(rounds):
            for name, fn in variants.items():
                t0 = time.process_time()
                for i in range(steps):
                    fn(torch.full((B,), start + i))
                times[name].append(1e3 * (time.process_time() - t0) / steps)
    return times


async def _batch_tok_s(engine: Engine, prompts: list[list[int]], max_new_tokens: int, **params: Any) -> float:
    """All prompts at once through a started engine (greedy); generated tokens per second of this process's CPU
    time (the worker thread and the event loop; other processes on the cores barely move it)."""
    t0 = time.process_time()
    handles = [
        engine.submit(p, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **params)) for p in prompts
    ]
    n = 0
    for h in handles:
        async for ev in h:
            if isinstance(ev, FinishEvent):
                if ev.reason != "length":
                    raise RuntimeError(f"request finished with {ev.reason}: {ev.error}")
                n += ev.completion_tokens
    return n / (time.process_time() - t0)


def engine_throughput(
    model: Transformer, prompts: list[list[int]], max_new_tokens: int, reps: int = 5
) -> dict[str, Any]:
    """Engine tokens per CPU second with len(prompts) concurrent requests: plain, every row traced, every row
    intervened (interleaved, medians over `reps`)."""
    skip = Intervention(skip=((model.config.n_layer - 1, "mlp"),))
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "trace": {"trace": True},
        "intervention": {"intervention": skip},
    }

    async def main() -> dict[str, list[float]]:
        engine = Engine(model, max_batch_size=len(prompts))
        engine.start()
        try:
            res: dict[str, list[float]] = {k: [] for k in variants}
            for kw in variants.values():
                await _batch_tok_s(engine, prompts, 8, **kw)  # warm-up
            for _ in range(reps):
                for name, kw in variants.items():
                    res[name].append(await _batch_tok_s(engine, prompts, max_new_tokens, **kw))
            return res
        finally:
            engine.stop()

    runs = asyncio.run(main())
    out: dict[str, Any] = {"batch": len(prompts), "max_new_tokens": max_new_tokens, "reps": reps}
    for name, r in runs.items():
        out[f"{name}_tok_per_cpu_s"] = median(r)
        out[f"{name}_reps_tok_per_cpu_s"] = r
    out["trace_vs_plain"] = out["trace_tok_per_cpu_s"] / out["plain_tok_per_cpu_s"]
    out["intervention_vs_plain"] = out["intervention_tok_per_cpu_s"] / out["plain_tok_per_cpu_s"]
    return out
