"""Sections that start servers and load them over HTTP: http and resid (one server), contention, naive."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from bench import contention as contention_bench
from bench import inproc, load, servers
from bench.prompts import make_prompts
from bench.sections.registry import Context, Part, section, timed
from bench.stats import median, ratio
from model.config import ModelConfig
from model.decode import auto_decode_weights
from model.fast import auto_kv_dtype, make_decoder
from model.transformer import Transformer

log = logging.getLogger("bench")


def cpu_figures(
    tokens: int, wall_s: float, server_cpu_s: float, main_thread_cpu_s: float, client_cpu_s: float
) -> dict[str, Any]:
    """The server's CPU use during one load run: tokens per server CPU second, cores it kept busy, the event loop's
    share (its main thread), and this process's CPU (the load client)."""
    return {
        "server_cpu_s": server_cpu_s,
        "server_main_thread_cpu_s": main_thread_cpu_s,
        "server_other_threads_cpu_s": server_cpu_s - main_thread_cpu_s,
        "server_main_thread_share": ratio(main_thread_cpu_s, server_cpu_s),
        "server_cores_busy": ratio(server_cpu_s, wall_s),
        "tok_per_server_cpu_s": ratio(tokens, server_cpu_s),
        "client_cpu_s": client_cpu_s,
    }


def measured_load(
    base_url: str,
    prompts: list[str],
    a: argparse.Namespace,
    c: int,
    stream: bool = True,
    server: servers.Server | None = None,
) -> dict[str, Any]:
    """One load run (`load.run_load`); with `server`, also its process's CPU seconds during the run."""
    s0, c0 = (server.cpu() if server else None), time.process_time()
    r = load.run_load(base_url, prompts, a.max_new_tokens, c, a.requests_per_client, stream=stream)
    client_s = time.process_time() - c0
    if s0 is not None and server is not None:
        s1 = server.cpu()
        r.update(
            cpu_figures(
                r["completion_tokens"],
                r["wall_s"],
                s1["total_s"] - s0["total_s"],
                s1["main_thread_s"] - s0["main_thread_s"],
                client_s,
            )
        )
    return r


CPU_KEYS = (
    "tok_per_server_cpu_s",
    "server_cpu_s",
    "server_main_thread_cpu_s",
    "server_main_thread_share",
    "server_cores_busy",
    "client_cpu_s",
)


def http_level(
    base_url: str,
    prompts: list[str],
    a: argparse.Namespace,
    c: int,
    stream: bool = True,
    reps: int | None = None,
    server: servers.Server | None = None,
) -> dict[str, Any]:
    """Median over reps of one concurrency level (each rep: c clients x requests_per_client requests); with
    `server`, the server process's CPU time too (`cpu_figures`)."""
    runs = [measured_load(base_url, prompts, a, c, stream, server) for _ in range(reps or a.http_reps)]
    errors = sum(r["errors"] for r in runs)
    if errors:
        log.warning(
            "c=%d: %d failed requests, first: %s", c, errors, next(r["first_error"] for r in runs if r["first_error"])
        )
    keys = ("tok_s", "e2e_p50_ms", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
    out: dict[str, Any] = {"concurrency": c, "errors": errors}
    for k in keys + (CPU_KEYS if server else ()):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = median(vals)
    out["reps"] = runs
    return out


def kv_cache_mb(cfg: ModelConfig, rows: int, bytes_per_value: int | None = None) -> float:
    """Size of the engine's preallocated KV cache (keys and values) for `rows` sequences; by default in the dtype a
    server here gives it (float16 with the fused float16 step, else float32)."""
    if bytes_per_value is None:  # the engine's own rule, on the step it would build for this config
        bytes_per_value = auto_kv_dtype(make_decoder(Transformer(cfg), auto_decode_weights())).itemsize
    return 2 * cfg.n_layer * rows * cfg.block_size * cfg.d_model * bytes_per_value / 2**20


@section(
    "http",
    "the server under 1..64 streaming HTTP clients: tok/s, TTFT, ITL, server CPU; its peak RSS",
    also={"resid": "the server with and without the per-layer residual-norm metrics, interleaved (same server)"},
)
def http_and_resid(ctx: Context) -> Part:
    """The Shortcut server: concurrency sweep, peak RSS, and resid-norm metrics on vs off."""
    a, prompts = ctx.a, ctx.prompts
    m: dict[str, Any] = {}
    d: dict[str, Any] = {}
    with servers.shortcut_server(ctx.ckpt, a.threads, a.server_max_batch, resid_norm_metrics=True) as srv:
        print(f"    shortcut server ready in {srv.started_s:.1f} s at {srv.base_url}")
        load.run_load(srv.base_url, prompts, min(4, a.max_new_tokens), 1)  # warm-up
        if ctx.selected("http"):
            sweep = []
            for c in a.concurrency:
                lvl = timed(
                    f"HTTP streaming, {c} clients", lambda c=c: http_level(srv.base_url, prompts, a, c, server=srv)
                )
                print(
                    f"    {lvl['tok_s']:.1f} tok/s, {lvl['tok_per_server_cpu_s'] or float('nan'):.1f} tok per server "
                    f"CPU s, TTFT p50 {lvl['ttft_p50_ms']:.1f} ms, ITL p99 {lvl['itl_p99_ms'] or float('nan'):.1f} ms"
                )
                sweep.append(lvl)
            d["http_sweep"] = sweep
            d["http_cpu"] = {
                "server_threads": a.threads,
                "note": f"server CPU: the `python -m app` process, all threads: {a.threads} torch thread(s) decoding "
                "in the engine's worker thread, and the main thread running the event loop (uvicorn, FastAPI, SSE: "
                "`server_main_thread_cpu_s`), read from its CPU clock before and after each load run; "
                "`server_cores_busy` = server CPU s / wall s; `client_cpu_s`: this process (the httpx load client, "
                "on the same machine)",
            }
            by_c = {lvl["concurrency"]: lvl for lvl in sweep}
            for c in sorted({1, a.mid, a.batch}):
                m[f"http_c{c}_tok_s"] = by_c[c]["tok_s"]
                m[f"http_c{c}_tok_per_server_cpu_s"] = by_c[c]["tok_per_server_cpu_s"]
            for c in sorted({1, a.mid, a.batch}):
                for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
                    m[f"http_c{c}_{k}"] = by_c[c][k]
        if ctx.selected("resid"):
            with servers.shortcut_server(
                ctx.ckpt, a.threads, a.server_max_batch, resid_norm_metrics=False, name="shortcut-no-norms"
            ) as off:
                load.run_load(off.base_url, prompts, min(4, a.max_new_tokens), 1)  # warm-up
                on_runs, off_runs = [], []
                for _ in range(max(2, a.http_reps)):  # interleaved so that drift hits both alike
                    on_runs.append(http_level(srv.base_url, prompts, a, a.mid, reps=1)["tok_s"])
                    off_runs.append(http_level(off.base_url, prompts, a, a.mid, reps=1)["tok_s"])
            d["resid_norm_metrics"] = {
                "concurrency": a.mid,
                "on_tok_s": on_runs,
                "off_tok_s": off_runs,
                "on_median": median(on_runs),
                "off_median": median(off_runs),
            }
            m[f"resid_norm_on_c{a.mid}_tok_s"] = median(on_runs)
            m[f"resid_norm_off_c{a.mid}_tok_s"] = median(off_runs)
        peak = srv.rss.peak_bytes if srv.rss else 0
        uss = srv.rss.peak_uss_bytes if srv.rss else 0
        m["server_peak_rss_mb"] = peak / 2**20 if peak else None
        m["server_peak_uss_mb"] = uss / 2**20 if uss else None
        d["server_rss"] = {
            "peak_mb": m["server_peak_rss_mb"],
            "peak_uss_mb": m["server_peak_uss_mb"],
            "samples": srv.rss.samples if srv.rss else 0,
            "max_batch_size": a.server_max_batch,
            "kv_cache_mb": kv_cache_mb(ctx.cfg, a.server_max_batch),
            "note": "resident set of the `python -m app` process, sampled every 50 ms (USS every"
            " 0.5 s) from its start to the end of its load; the KV cache's pages"
            " become resident as sequences fill them",
        }
    return Part(details=d, metrics=m)


@section("contention", "8 streams alone, then next to 16 heavy /diagnostics requests, on a fresh server")
def contention(ctx: Context) -> Part:
    out = timed("8 streams next to 16 heavy diagnostics requests", lambda: contention_section(ctx))
    busy = out["with_diagnostics"]
    return Part(
        details={"contention": out},
        metrics={
            "contention_itl_p50_ms": busy["itl_p50_ms"],
            "contention_itl_p99_ms": busy["itl_p99_ms"],
            "contention_itl_max_ms": busy["itl_max_ms"],
            "contention_diagnostics_p50_ms": out["diagnostics_p50_ms"],
        },
    )


def contention_section(ctx: Context) -> dict[str, Any]:
    """8 streams alone, then next to 16 heavy /diagnostics requests (bench/contention.py), on a fresh server."""
    a, prompts = ctx.a, ctx.prompts
    diag_prompt = make_prompts(1, min(256, ctx.cfg.block_size))[0]
    forward_ms = ctx.metrics.get("forward_ms")
    if forward_ms is None:
        forward_ms = inproc.diagnostics_vs_forward(ctx.model, list(diag_prompt.encode()), 3)["forward_ms"]
    with servers.shortcut_server(ctx.ckpt, a.threads, a.server_max_batch, name="shortcut-contention") as srv:
        load.run_load(srv.base_url, prompts, min(4, a.max_new_tokens), 1)  # warm-up
        out = contention_bench.run(
            srv.base_url, prompts, diag_prompt, a.max_new_tokens, forward_ms, streams=a.mid, diags=2 * a.mid
        )
    print(
        f"    streams alone: ITL p50/p99/max {out['alone']['itl_p50_ms']:.1f}/{out['alone']['itl_p99_ms']:.1f}/"
        f"{out['alone']['itl_max_ms']:.1f} ms; with diagnostics: {out['with_diagnostics']['itl_p50_ms']:.1f}/"
        f"{out['with_diagnostics']['itl_p99_ms']:.1f}/{out['with_diagnostics']['itl_max_ms']:.1f} ms "
        f"(bound 2 x p50 + forward = {out['gap_bound_ms'] or float('nan'):.1f} ms); diagnostics p50 "
        f"{out['diagnostics_p50_ms'] or float('nan'):.0f} ms"
    )
    return out


@section("naive", "a naive FastAPI server calling HF generate per request, under B clients (needs transformers)")
def naive(ctx: Context) -> Part:
    B = ctx.batch
    out = timed(f"naive FastAPI + HF server, {B} clients", lambda: naive_section(ctx))
    return Part(details={"naive": out}, metrics={f"naive_http_c{B}_tok_s": out["tok_s"]})


def naive_section(ctx: Context) -> dict[str, Any]:
    """The naive server under `a.batch` non-streaming clients (one request each)."""
    a, prompts = ctx.a, ctx.prompts
    with servers.naive_server(ctx.ckpt, a.threads) as srv:
        print(f"    naive server ready in {srv.started_s:.1f} s at {srv.base_url}")
        load.run_load(srv.base_url, prompts, min(4, a.max_new_tokens), 1, stream=False)  # warm-up
        runs = [
            load.run_load(srv.base_url, prompts, a.max_new_tokens, a.batch, 1, stream=False) for _ in range(a.http_reps)
        ]
        peak = srv.rss.peak_bytes if srv.rss else 0
    return {
        "concurrency": a.batch,
        "requests_per_client": 1,
        "tok_s": median([r["tok_s"] for r in runs]),
        "e2e_p50_ms": median([r["e2e_p50_ms"] for r in runs]),
        "errors": sum(r["errors"] for r in runs),
        "peak_rss_mb": peak / 2**20 if peak else None,
        "reps": runs,
    }
