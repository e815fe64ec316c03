"""Sections that compare costs: interventions (against the step from before them), peers (CTranslate2), aoti
(AOTInductor), and memory (the server's RSS, split)."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import interventions as interventions_bench
from bench import memsplit
from bench import peers as peers_bench
from bench.sections.registry import Context, Part, section, timed

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent.parent


@section("interventions", "decode step and engine with gates / trace on and off, against the step from before them")
def interventions(ctx: Context) -> Part:
    a, B = ctx.a, ctx.batch
    iv: dict[str, Any] = {}
    iv["step"] = timed(
        "decode step with gates / trace on and off",
        lambda: interventions_bench.step_costs(ctx.model, len(ctx.ids0), a.profile_steps, (1, B)),
    )
    iv["engine"] = timed(
        f"engine, {B} rows, trace / intervention on every row",
        lambda: interventions_bench.engine_throughput(
            ctx.model, [list(p.encode()) for p in ctx.prompts[:B]], a.max_new_tokens, max(a.reps, 5)
        ),
    )
    return Part(
        details={"interventions": iv},
        metrics={
            "step_no_intervention_vs_before_bs1": iv["step"]["bs1_none_throughput_vs_baseline"],
            f"step_no_intervention_vs_before_bs{B}": iv["step"][f"bs{B}_none_throughput_vs_baseline"],
            f"engine_bs{B}_trace_vs_plain": iv["engine"]["trace_vs_plain"],
            f"engine_bs{B}_intervention_vs_plain": iv["engine"]["intervention_vs_plain"],
        },
    )


def peer_batches(a: argparse.Namespace) -> tuple[int, ...]:
    """Batch sizes of the peers comparison: 1 and `a.batch`, and `a.mid` too when the http section runs (the peer at
    batch c is the yardstick of HTTP at c clients; `http_vs_peers`)."""
    return tuple(sorted({1, a.batch} | ({a.mid} if "http" in a.sections else set())))


@section("peers", "CTranslate2 float32 / int8 built from our checkpoint against our engine and step, CPU time")
def peers(ctx: Context) -> Part:
    a = ctx.a
    out = timed(
        "peers: CTranslate2 float32 / int8 from our checkpoint, and the machine's limit", lambda: peers_section(ctx)
    )
    p = out["cpu"]
    if (p["prompt_tokens"], p["max_new_tokens"]) != (a.prompt_bytes, a.max_new_tokens):
        log.warning(
            "peers ran %d-token prompts + %d new tokens, the HTTP load %d + %d: the HTTP / peer ratios mislead",
            p["prompt_tokens"],
            p["max_new_tokens"],
            a.prompt_bytes,
            a.max_new_tokens,
        )
    m: dict[str, Any] = {}
    for b in p["batches"]:
        m[f"engine_bs{b}_cpu_ms_per_token"] = p[f"engine_bs{b}_e2e_cpu_ms_per_token"]
        m[f"step_bs{b}_cpu_ms_per_token"] = p[f"step_bs{b}_decode_cpu_ms_per_token"]
        for name in ("ct2_float32", "ct2_int8"):
            m[f"{name}_bs{b}_cpu_ms_per_token"] = p[f"{name}_bs{b}_e2e_cpu_ms_per_token"]
            m[f"{name}_bs{b}_decode_cpu_ms_per_token"] = p[f"{name}_bs{b}_decode_cpu_ms_per_token"]
    m["machine_limit_bs1_tok_s"] = out["limit"][f"{out['limit']['our_weights']}_limit_tok_s"]
    m["step_bs1_fraction_of_limit"] = out["limit"].get("ours_fraction_of_limit")
    return Part(details={"peers": out}, metrics=m)


def peers_section(ctx: Context) -> dict[str, Any]:
    """CTranslate2 float32 and int8 built from our checkpoint: greedy tokens checked against ours (float32), then CPU
    time per token against our engine and bare step at the `peer_batches`, interleaved; the machine's limit."""
    a, model = ctx.a, ctx.model
    dirs = {q: peers_bench.convert_ct2(model, ctx.tmp / f"ct2-{q}", q) for q in ("float32", "int8")}
    batches = peer_batches(a)
    ids = [list(p.encode()) for p in ctx.prompts[: max(batches)]]
    match = peers_bench.tokens_match(model, dirs["float32"], ids[0], a.max_new_tokens)
    if not match["equal"]:
        log.warning("CTranslate2 float32's greedy tokens differ from ours from token %s", match["first_difference"])
    cpu = peers_bench.compare(
        model,
        ids,
        a.max_new_tokens,
        {f"ct2_{q}": path for q, path in dirs.items()},
        batches,
        rounds=max(a.reps, 5),
    )
    limit = peers_bench.machine_limit(model, cpu["our_weights"], cpu.get("step_bs1_decode_cpu_ms_per_token"))
    threads = peers_bench.thread_check(dirs["int8"], "int8", ids, a.max_new_tokens, tuple(sorted({1, a.batch})))
    return {
        "greedy_tokens_match_ours_float32": match,
        "cpu": cpu,
        "limit": limit,
        "ct2_int8_threads": threads,
        "model_bytes": {q: (path / "model.bin").stat().st_size for q, path in dirs.items()},
    }


@section("aoti", "our decode step compiled by AOTInductor against the fused and TorchScript steps, CPU time")
def aoti(ctx: Context) -> Part:
    from bench import aoti as aoti_bench

    a, B = ctx.a, ctx.batch
    out = timed(
        "AOTInductor-compiled decode step (compile, then interleaved with ours)",
        lambda: aoti_bench.compare_steps(
            ctx.model, ctx.tmp, len(ctx.ids0), a.max_new_tokens - 1, tuple(sorted({1, B})), rounds=max(a.reps, 3)
        ),
    )
    return Part(
        details={"aoti": out},
        metrics={
            f"aoti_step_bs{b}_cpu_ms_per_token": out[f"aoti_float32_bs{b}_cpu_ms_per_token"] for b in sorted({1, B})
        },
    )


@section("memory", "the server's RSS split: torch, app imports, weights, KV cache, rest (with http: of its peak)")
def memory(ctx: Context) -> Part:
    out = timed("server memory split", lambda: memory_section(ctx))
    return Part(details={"memory": out}, metrics={"server_rss_rest_mb": out.get("rest_mb")})


def memory_section(ctx: Context) -> dict[str, Any]:
    """RSS after each stage of a fresh process loading what the server loads (`bench.memsplit`), and the rest of the
    server's peak RSS (when the http section ran in this run) beyond those parts."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memsplit", str(ctx.ckpt), str(ctx.a.server_max_batch)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return memsplit.split(json.loads(proc.stdout.strip().splitlines()[-1]), ctx.metrics.get("server_peak_rss_mb"))
