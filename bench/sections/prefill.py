"""Sections on what a prefill does to its neighbours, in this process: chunked (issue #28 item 3), fairness (#24)."""

from __future__ import annotations

from typing import Any

from bench import prefill
from bench.sections.registry import Context, Part, section, timed

CHUNKS = (0, 16, 32, 64)  # SHORTCUT_PREFILL_CHUNK values compared (0: whole prompts)


@section(
    "chunked",
    "streams' inter-token p50/p99 while long prompts arrive next to them, per prefill chunk; the newcomers' TTFT",
)
def chunked(ctx: Context) -> Part:
    a, cfg = ctx.a, ctx.cfg
    streams = max(1, min(ctx.batch, a.server_max_batch) - 1)  # one row left for the newcomer
    window = cfg.block_size
    cost = timed("prefill chunk cost vs a decode step", lambda: prefill.chunk_cost(ctx.model, [16, 32, 64], streams))
    sizes = dict(
        streams=streams,
        stream_prompt_len=min(64, window // 4),
        stream_tokens=window - min(64, window // 4) - 2,
        long_prompt_len=window - 8,
        long_tokens=min(8, window // 8),
        every=max(8, window // 8),
        max_batch_size=streams + 1,
    )
    out = timed(
        f"a {sizes['long_prompt_len']}-token prompt next to {streams} streams, chunks {CHUNKS}",
        lambda: prefill.long_prompt_next_to_streams(ctx.model, list(CHUNKS), reps=a.reps, **sizes),
    )
    out["cost"] = cost
    metrics: dict[str, Any] = {}
    for c in CHUNKS:
        run = out[f"chunk_{c}"]
        metrics[f"chunked_{c}_itl_p50_ms"] = run["itl_p50_ms"]
        metrics[f"chunked_{c}_itl_p99_ms"] = run["itl_p99_ms"]
        metrics[f"chunked_{c}_newcomer_ttft_p50_ms"] = run["newcomer_ttft_p50_ms"]
    return Part(details={"chunked": out}, metrics=metrics)


@section("fairness", "a small request's TTFT next to the largest allowed request (16 prompts x n=8, traced)")
def fairness(ctx: Context) -> Part:
    a = ctx.a
    out = timed(
        "a small request next to 16 prompts x n=8 of the whole window, traced",
        lambda: prefill.small_next_to_largest(ctx.model, max_batch_size=a.server_max_batch),
    )
    return Part(
        details={"fairness": out},
        metrics={
            "fairness_small_ttft_ms": out["beside_largest"]["ttft_ms"],
            "fairness_small_ttft_steps": out["beside_largest"]["ttft_decode_steps"],
            "fairness_small_alone_ttft_ms": out["alone"]["ttft_ms"],
        },
    )
