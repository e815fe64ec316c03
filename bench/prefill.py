"""In-process measurements of what a prefill does to its neighbours.

- `chunk_cost`: process CPU time of a prefill of c prompt tokens through the served step, against one decode step of
  `rows` rows (what a chunk adds to a step; the ratio picks `SHORTCUT_PREFILL_CHUNK`).

- `long_prompt_next_to_streams`: `streams` greedy streams decode; every `every` steps (counted on the first stream's
  tokens) a long prompt arrives next to them and asks for a few tokens. The streams' inter-token gaps (as their
  consumer on the event loop sees them, once all of them run) p50 / p99 / max, the newcomers' time to first token,
  the streams' own time to first token (they arrive together: a burst), the run's wall and process CPU time; once per
  `prefill_chunk` value (0: whole prompts).
- `small_next_to_largest`: the largest request the server allows (`prompts` x `n` rows of one group, each a short
  prompt and the rest of the window in new tokens, traced with the logit lens, logprobs) runs; a small request sent
  `after_steps` decode steps later: its time to first token, in seconds and in decode steps, against the same small
  request alone.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from bench.stats import median, percentile
from model.engine import Engine, EngineObserver, FinishEvent, SamplingParams
from model.transformer import Transformer


def _ms(x: float | None) -> float | None:
    return round(x * 1e3, 3) if x is not None else None


@torch.inference_mode()
def chunk_cost(model: Transformer, sizes: list[int], rows: int = 31, reps: int = 7) -> dict[str, Any]:
    """Median process CPU ms of one decode step of `rows` rows (at position half the window) and of a prefill of
    each size in `sizes` from position 0 (through the step the engine serves: the fused step's own prefill, else the
    reference forward), and each prefill / the step."""
    engine = Engine(model, max_batch_size=rows + 1)
    step, cache, cfg = engine.decode_step, engine.cache, model.config
    tokens = torch.randint(0, cfg.vocab_size, (max(rows, *sizes),), generator=torch.Generator().manual_seed(0))
    pos = torch.full((rows,), cfg.block_size // 2)
    row = cache.rows(rows, rows + 1)

    def cpu_ms(fn: Any) -> float:
        times = []
        for _ in range(reps):
            c0 = time.process_time()
            fn()
            times.append((time.process_time() - c0) * 1e3)
        return float(median(times) or 0.0)

    def prefill(c: int) -> Any:
        if hasattr(step, "prefill"):
            return lambda: step.prefill(tokens[:c], row)
        return lambda: model(tokens[None, :c], cache=row, pos=torch.zeros(1, dtype=torch.long), last_only=True)

    decode_ms = cpu_ms(lambda: step(tokens[:rows], cache.rows(0, rows), pos))
    out: dict[str, Any] = {
        "decode_step": engine.decode_backend,
        "rows": rows,
        "decode_step_cpu_ms": round(decode_ms, 3),
    }
    for c in sizes:
        ms = cpu_ms(prefill(c))
        out[f"prefill_{c}_cpu_ms"] = round(ms, 3)
        out[f"prefill_{c}_over_step"] = round(ms / decode_ms, 3) if decode_ms > 0 else None
    return out


async def _stream(handle: Any, times: list[float]) -> None:
    """Consume a request's events, noting each token's arrival."""
    async for ev in handle:
        if isinstance(ev, FinishEvent):
            if ev.reason != "length":
                raise RuntimeError(f"request finished with {ev.reason}: {ev.error}")
            return
        times.append(time.perf_counter())


async def _long_prompt_run(
    model: Transformer,
    prefill_chunk: int,
    stream_prompts: list[list[int]],
    stream_tokens: int,
    long_prompt: list[int],
    long_tokens: int,
    every: int,
    max_batch_size: int,
) -> dict[str, Any]:
    engine = Engine(model, max_batch_size=max_batch_size, max_queue=256, prefill_chunk=prefill_chunk)
    engine.warm_up()
    engine.start()
    try:
        greedy = SamplingParams(max_new_tokens=stream_tokens, temperature=0.0)
        times: list[list[float]] = [[] for _ in stream_prompts]
        t0, c0 = time.perf_counter(), time.process_time()
        tasks = [
            asyncio.ensure_future(_stream(engine.submit(p, greedy), ts))
            for p, ts in zip(stream_prompts, times, strict=True)
        ]
        newcomers: list[tuple[float, list[float]]] = []  # (submitted at, token arrivals)
        jobs = []
        first = times[0]
        while not all(times):  # the burst: every stream admitted at once (idle) or a budget per step (chunked)
            await asyncio.sleep(0.0005)
        t_all = time.perf_counter()
        mark = len(first) + every
        while not tasks[0].done():
            if len(first) >= mark and mark + every + long_tokens < stream_tokens:  # (the newcomer ends before them)
                arrivals: list[float] = []
                newcomers.append((time.perf_counter(), arrivals))
                params = SamplingParams(max_new_tokens=long_tokens, temperature=0.0)
                jobs.append(asyncio.ensure_future(_stream(engine.submit(long_prompt, params), arrivals)))
                mark += every
            await asyncio.sleep(0.0005)
        await asyncio.wait_for(asyncio.gather(*tasks, *jobs), 600)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        engine.stop()
    # the streams' gaps once all of them run (the burst's are its own figure: the streams' time to first token)
    gaps = [b - a for ts in times for a, b in zip(ts, ts[1:], strict=False) if a >= t_all]
    ttft = [arr[0] - t for t, arr in newcomers]
    stream_ttft = [ts[0] - t0 for ts in times]
    p50, p99 = median(gaps), percentile(gaps, 99)
    return {
        "prefill_chunk": prefill_chunk,
        "newcomers": len(newcomers),
        "stream_gaps": len(gaps),
        "itl_p50_ms": _ms(p50),
        "itl_p99_ms": _ms(p99),
        "itl_max_ms": _ms(max(gaps, default=None)),
        "itl_p99_over_p50": round(p99 / p50, 3) if p50 and p99 else None,
        "newcomer_ttft_p50_ms": _ms(median(ttft)),
        "newcomer_ttft_max_ms": _ms(max(ttft, default=None)),
        "burst_stream_ttft_p50_ms": _ms(median(stream_ttft)),
        "burst_stream_ttft_max_ms": _ms(max(stream_ttft)),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "tokens": sum(len(ts) for ts in times) + sum(len(arr) for _, arr in newcomers),
    }


def long_prompt_next_to_streams(
    model: Transformer,
    chunks: list[int],
    *,
    streams: int = 31,
    stream_prompt_len: int = 64,
    stream_tokens: int = 190,
    long_prompt_len: int = 248,
    long_tokens: int = 8,
    every: int = 32,
    max_batch_size: int = 32,
    reps: int = 1,
) -> dict[str, Any]:
    """Per `prefill_chunk` value (in order, each repeated `reps` times, alternating), the figures of one run (see the
    module doc); `runs` holds every repetition, the top level the median run by p99/p50."""
    text = list(range(32, 127))
    prompts = [[text[(i * 7 + j) % len(text)] for j in range(stream_prompt_len)] for i in range(streams)]
    long_prompt = [text[(j * 3) % len(text)] for j in range(long_prompt_len)]
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in chunks}
    for _ in range(reps):
        for c in chunks:
            runs[c].append(
                asyncio.run(
                    _long_prompt_run(model, c, prompts, stream_tokens, long_prompt, long_tokens, every, max_batch_size)
                )
            )
    out: dict[str, Any] = {
        "setup": {
            "streams": streams,
            "stream_prompt_tokens": stream_prompt_len,
            "stream_new_tokens": stream_tokens,
            "long_prompt_tokens": long_prompt_len,
            "long_new_tokens": long_tokens,
            "every_steps": every,
            "max_batch_size": max_batch_size,
            "reps": reps,
        }
    }
    for c, rs in runs.items():
        rs.sort(key=lambda r: r["itl_p99_over_p50"] or 0.0)
        out[f"chunk_{c}"] = {**rs[len(rs) // 2], "runs": rs}
    return out


class _Steps(EngineObserver):
    """Counts decode steps; notes the step at which a prompt of each length was first prefilled (worker side)."""

    def __init__(self) -> None:
        self.steps = 0
        self.prefilled_at: dict[int, int] = {}

    def on_step(self, batch_size: int) -> None:
        self.steps += 1

    def on_prefill(self, prompt_tokens: int, queue_time_s: float) -> None:
        self.prefilled_at.setdefault(prompt_tokens, self.steps)


async def _small_run(
    model: Transformer,
    big_rows: int,
    big_prompt: list[int],
    big_params: SamplingParams,
    small_prompt: list[int],
    small_tokens: int,
    after_steps: int,
    max_batch_size: int,
) -> dict[str, Any]:
    steps = _Steps()
    engine = Engine(model, max_batch_size=max_batch_size, max_queue=512, observer=steps)
    engine.warm_up()
    engine.start()
    try:
        group = object()  # one client request: its rows are one group, as app/ submits the choices of one request
        big = [engine.submit(big_prompt, big_params, group) for _ in range(big_rows)]
        t_big = time.perf_counter()
        while big_rows and steps.steps < after_steps:
            await asyncio.sleep(0.0005)
        step0, t0 = steps.steps, time.perf_counter()
        handle = engine.submit(small_prompt, SamplingParams(max_new_tokens=small_tokens, temperature=0.0))
        async for ev in handle:
            if not isinstance(ev, FinishEvent):
                ttft, ttft_steps = time.perf_counter() - t0, steps.prefilled_at[len(small_prompt)] - step0
                break
        for h in (handle, *big):
            h.cancel()
        t_end = time.perf_counter()
        for h in big:
            await asyncio.wait_for(h.result(), 600)
    finally:
        engine.stop()
    return {
        "ttft_ms": _ms(ttft),
        "ttft_decode_steps": ttft_steps,
        "sent_after_steps": step0,
        "big_running_s": round(t_end - t_big, 3) if big_rows else None,
    }


def small_next_to_largest(
    model: Transformer,
    *,
    prompts: int = 16,
    n: int = 8,
    prompt_len: int = 6,
    small_prompt_len: int = 8,
    small_tokens: int = 8,
    after_steps: int = 10,
    max_batch_size: int = 32,
    logprobs: int = 5,
    lens_top: int = 5,
) -> dict[str, Any]:
    """The small request's time to first token next to the largest request (see the module doc), and alone."""
    window = model.config.block_size
    big_prompt = list(range(65, 65 + prompt_len))
    big_params = SamplingParams(
        max_new_tokens=window - prompt_len,
        temperature=0.0,
        trace=True,
        logit_lens_top=lens_top,
        logprobs=logprobs,
    )
    if small_prompt_len == prompt_len:
        raise ValueError("the small request's prompt length must differ from the big one's (told apart by it)")
    small_prompt = list(range(97, 97 + small_prompt_len))
    args = (small_prompt, small_tokens, after_steps, max_batch_size)
    beside = asyncio.run(_small_run(model, prompts * n, big_prompt, big_params, *args))
    alone = asyncio.run(_small_run(model, 0, big_prompt, big_params, *args))
    return {
        "setup": {
            "big_rows": prompts * n,
            "big_prompts": prompts,
            "big_n": n,
            "big_prompt_tokens": prompt_len,
            "big_new_tokens": window - prompt_len,
            "big_trace_lens_top": lens_top,
            "big_logprobs": logprobs,
            "small_prompt_tokens": small_prompt_len,
            "max_batch_size": max_batch_size,
            "sent_after_steps": after_steps,
        },
        "beside_largest": beside,
        "alone": alone,
    }
