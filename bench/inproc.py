"""In-process measurements: the Engine at batch 1, diagnostics vs a plain forward, and a decode-step profile."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from bench.stats import median, rate
from model.decode import FastDecoder, auto_decode_weights
from model.diagnostics import DiagnosticsOptions, run_diagnostics
from model.engine import Engine, FinishEvent, SamplingParams
from model.fast import FusedDecoder, auto_kv_dtype, fused_available, supports
from model.kv_cache import KVCache
from model.lens import TunedLens
from model.transformer import Transformer


@dataclass
class EngineRun:
    """One request through the engine, timed on the event-loop side."""

    tokens: list[int]
    e2e_s: float  # submit -> finish event
    decode_s: float  # first token -> last token
    ttft_s: float  # submit -> first token
    cpu_e2e_s: float  # process CPU time over e2e (robust to other processes taking the cores)
    cpu_decode_s: float  # process CPU time from first to last token


async def _generate_once(engine: Engine, prompt: list[int], max_new_tokens: int) -> EngineRun:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    handle = engine.submit(prompt, params)
    tokens: list[int] = []
    arrivals: list[tuple[float, float]] = []  # (wall, cpu)
    async for ev in handle:
        now, cpu = time.perf_counter(), time.process_time()
        if isinstance(ev, FinishEvent):
            if ev.reason != "length":
                raise RuntimeError(f"engine request finished with {ev.reason}: {ev.error}")
            return EngineRun(
                tokens=tokens,
                e2e_s=now - t0,
                decode_s=arrivals[-1][0] - arrivals[0][0],
                ttft_s=arrivals[0][0] - t0,
                cpu_e2e_s=cpu - c0,
                cpu_decode_s=arrivals[-1][1] - arrivals[0][1],
            )
        tokens.append(ev.token_id)
        arrivals.append((now, cpu))
    raise RuntimeError("engine stream ended without a finish event")


def engine_bs1(
    model: Transformer, prompt: list[int], max_new_tokens: int, reps: int, max_batch_size: int = 64
) -> dict[str, Any]:
    """Greedy generation of one sequence at a time through a started Engine; medians over `reps` runs."""

    backend: list[str] = []

    async def main() -> list[EngineRun]:
        engine = Engine(model, max_batch_size=max_batch_size)
        backend.append(engine.decode_backend)
        engine.start()
        try:
            await _generate_once(engine, prompt, min(8, max_new_tokens))  # warm-up
            return [await _generate_once(engine, prompt, max_new_tokens) for _ in range(reps)]
        finally:
            engine.stop()

    runs = asyncio.run(main())
    n = max_new_tokens
    e2e = [rate(n, r.e2e_s) for r in runs]
    pure = [rate(n - 1, r.decode_s) for r in runs] if n > 1 else []
    return {
        "tok_s": median(e2e),
        "decode_only_tok_s": median(pure) if pure else None,
        "ms_per_token_decode": 1e3 / median(pure) if pure else None,
        "ttft_ms": 1e3 * median([r.ttft_s for r in runs]),
        "cpu_ms_per_token": 1e3 * median([r.cpu_e2e_s / n for r in runs]),
        "cpu_ms_per_token_decode": 1e3 * median([r.cpu_decode_s / (n - 1) for r in runs]) if n > 1 else None,
        "reps_tok_s": e2e,
        "reps_decode_only_tok_s": pure,
        "tokens": runs[-1].tokens,
        "decode_step": backend[0],
    }


def diagnostics_vs_forward(model: Transformer, ids: list[int], reps: int) -> dict[str, Any]:
    """Median wall time of norms-only `run_diagnostics` and of one plain forward of the same prompt (interleaved)."""
    idx = torch.tensor([ids], dtype=torch.long)  # (1, T)
    opts = DiagnosticsOptions()
    diag, fwd, diag_cpu, fwd_cpu = [], [], [], []
    with torch.inference_mode():
        run_diagnostics(model, ids, opts)  # warm-up
        model(idx)
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            run_diagnostics(model, ids, opts)
            t1, c1 = time.perf_counter(), time.process_time()
            model(idx)
            t2, c2 = time.perf_counter(), time.process_time()
            diag.append(1e3 * (t1 - t0))
            fwd.append(1e3 * (t2 - t1))
            diag_cpu.append(1e3 * (c1 - c0))
            fwd_cpu.append(1e3 * (c2 - c1))
    return {
        "prompt_tokens": len(ids),
        "diagnostics_norms_ms": median(diag),
        "forward_ms": median(fwd),
        "diagnostics_norms_cpu_ms": median(diag_cpu),
        "forward_cpu_ms": median(fwd_cpu),
        "reps_diagnostics_ms": diag,
        "reps_forward_ms": fwd,
    }


def lens_cost(model: Transformer, lens: TunedLens, ids: list[int], reps: int, k: int = 5) -> dict[str, Any]:
    """Median wall and CPU time of `run_diagnostics` with logit_lens=k and with tuned_lens=k (interleaved)."""
    plain, tuned = DiagnosticsOptions(logit_lens=k), DiagnosticsOptions(tuned_lens=k)
    runs: dict[str, list[float]] = {"logit": [], "tuned": [], "logit_cpu": [], "tuned_cpu": []}
    with torch.inference_mode():
        run_diagnostics(model, ids, plain)  # warm-up
        run_diagnostics(model, ids, tuned, lens=lens)
        for _ in range(reps):
            for name, opts in (("logit", plain), ("tuned", tuned)):
                t0, c0 = time.perf_counter(), time.process_time()
                run_diagnostics(model, ids, opts, lens=lens)
                runs[name].append(1e3 * (time.perf_counter() - t0))
                runs[f"{name}_cpu"].append(1e3 * (time.process_time() - c0))
    logit, tuned_ms = median(runs["logit"]), median(runs["tuned"])
    return {
        "prompt_tokens": len(ids),
        "top_k": k,
        "diagnostics_logit_lens_ms": logit,
        "diagnostics_tuned_lens_ms": tuned_ms,
        "diagnostics_logit_lens_cpu_ms": median(runs["logit_cpu"]),
        "diagnostics_tuned_lens_cpu_ms": median(runs["tuned_cpu"]),
        "tuned_over_logit": tuned_ms / logit,
        "reps_logit_ms": runs["logit"],
        "reps_tuned_ms": runs["tuned"],
    }


CATEGORIES = (  # (category, substrings of aten op names), first match wins
    ("attention", ("bmm", "scaled_dot_product", "flash_attention", "_softmax")),
    ("matmul", ("addmm", "aten::mm", "matmul", "fbgemm_linear")),
    ("kv_cache_write", ("index_put", "index_copy")),
    ("layer_norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("mask_and_positions", ("arange", "where", "le", "scalar_tensor", "max", "_local_scalar_dense", "item")),
    ("embedding", ("embedding", "index_select")),
    ("argmax", ("argmax",)),
)


def _category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "views_copies_other"


def profile_decode(model: Transformer, prompt: list[int], steps: int, batch: int = 1) -> dict[str, Any]:
    """Time the TorchScript decode step of `batch` rows (FastDecoder + argmax), profile it by aten op.

    Every row holds the same prompt; as in the engine, the cache is a view of the first rows of a 64-row cache.
    The generic path (`model(tok, cache=..., last_only=True)`) and the fused C step (`model.fast`, the engine's
    step where it is built) are timed too, for comparison.
    """
    from torch.profiler import ProfilerActivity, profile

    cfg = model.config
    steps = max(1, min(steps, cfg.block_size - len(prompt) - 1))
    cache = KVCache(cfg, max(64, batch)).rows(0, batch)

    def prefill() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            model(torch.tensor([prompt] * batch), cache=cache, pos=torch.zeros(batch, dtype=torch.long), last_only=True)
        return torch.tensor([[prompt[-1]]] * batch), torch.full((batch,), len(prompt))  # (B, 1), (B,)

    fast = FastDecoder(model, weights=auto_decode_weights())  # the TorchScript step
    fused = FusedDecoder(model, weights=fast.weights) if fused_available() and supports(cfg) else None

    def decode(
        tok: torch.Tensor, pos: torch.Tensor, n: int, generic: bool = False, step: FastDecoder | FusedDecoder = fast
    ) -> tuple[float, float]:
        with torch.inference_mode():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                if generic:
                    logits = model(tok, cache=cache, pos=pos, last_only=True).logits[:, -1]  # (B, V)
                else:
                    logits = step(tok[:, 0], cache, pos).logits  # (B, V)
                tok, pos = logits.argmax(-1, keepdim=True), pos + 1
            return time.perf_counter() - t0, time.process_time() - c0

    decode(*prefill(), 3)  # warm-up
    decode(*prefill(), 3, generic=True)
    generic_wall, generic_cpu = decode(*prefill(), steps, generic=True)
    wall, cpu = decode(*prefill(), steps)
    fused_cpu = None
    if fused is not None:  # the fused C step on the same prefilled cache (not profiled: it is one call)
        decode(*prefill(), 3, step=fused)
        fused_cpu = decode(*prefill(), steps, step=fused)[1]
    tok, pos = prefill()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(tok, pos, steps)
    ops: list[dict[str, Any]] = []
    cats: dict[str, float] = {}
    total = 0.0
    for ev in prof.key_averages():
        self_ms = ev.self_cpu_time_total / 1e3 / steps  # per decode step
        if self_ms <= 0:
            continue
        total += self_ms
        cats[_category(ev.key)] = cats.get(_category(ev.key), 0.0) + self_ms
        ops.append({"op": ev.key, "self_ms_per_step": self_ms, "calls_per_step": ev.count / steps})
    ops.sort(key=lambda o: -o["self_ms_per_step"])
    for o in ops:
        o["share"] = o["self_ms_per_step"] / total if total else None
    return {
        "batch": batch,
        "weights": fast.weights,
        "forward_step_ms": 1e3 * wall / steps,
        "forward_step_cpu_ms": 1e3 * cpu / steps,
        "generic_forward_step_ms": 1e3 * generic_wall / steps,
        "generic_forward_step_cpu_ms": 1e3 * generic_cpu / steps,
        "fused_step_cpu_ms": 1e3 * fused_cpu / steps if fused_cpu is not None else None,
        "profiled_step_ms": total,
        "aten_calls_per_step": sum(o["calls_per_step"] for o in ops),
        "categories_ms_per_step": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_ops": ops[:12],
    }


def gil_contention(
    model: Transformer,
    prompt: list[int],
    steps: int,
    batches: tuple[int, ...] = (1, 32),
    busy_ms: float = 0.5,
    idle_ms: float = 1.0,
) -> dict[str, Any]:
    """Decode-step time alone and next to a Python thread that computes `busy_ms` then sleeps `idle_ms`.

    The thread stands in for the server's event loop. An eager step hands the GIL over at every aten op and
    waits for the other thread's burst each time; the TorchScript step (the engine's) releases it once.
    Medians over 3 runs of `steps` steps, ms per step, for the eager and the scripted decoder.
    """
    cfg = model.config
    weights = auto_decode_weights()  # as the engine runs it
    decoders: dict[str, FastDecoder | FusedDecoder] = {
        "eager": FastDecoder(model, script=False, weights=weights),
        "scripted": FastDecoder(model, weights=weights),
    }
    if fused_available() and supports(cfg):  # the fused C step: one ctypes call, the GIL released throughout
        decoders["fused"] = FusedDecoder(model, weights=weights)
    start = min(len(prompt), cfg.block_size - steps - 1)

    def step_ms(dec: FastDecoder | FusedDecoder, batch: int) -> float:
        cache = KVCache(cfg, batch, dtype=auto_kv_dtype(dec))  # as the engine gives it
        tok, pos = torch.zeros(batch, dtype=torch.long), torch.full((batch,), start)
        dec(tok, cache, pos)  # warm-up (and TorchScript's profiling runs)
        dec(tok, cache, pos + 1)
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(steps):
                dec(tok, cache, pos + i)
            runs.append(1e3 * (time.perf_counter() - t0) / steps)
        return median(runs)

    stop = threading.Event()

    def python_bursts() -> None:
        while not stop.is_set():
            end = time.perf_counter() + busy_ms / 1e3
            while time.perf_counter() < end:
                pass
            time.sleep(idle_ms / 1e3)

    out: dict[str, Any] = {
        "busy_ms": busy_ms,
        "idle_ms": idle_ms,
        "steps": steps,
        "weights": weights,
        "scripted": decoders["scripted"].scripted,
    }
    for b in batches:
        for name, dec in decoders.items():
            out[f"{name}_bs{b}_alone_ms"] = step_ms(dec, b)
    thread = threading.Thread(target=python_bursts, daemon=True)
    thread.start()
    try:
        for b in batches:
            for name, dec in decoders.items():
                out[f"{name}_bs{b}_with_python_thread_ms"] = step_ms(dec, b)
    finally:
        stop.set()
        thread.join()
    return out
