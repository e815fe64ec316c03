"""Streams next to heavy /diagnostics: how much a burst of diagnostics jobs slows running token streams.

8 streaming clients alone, then the same 8 streams while 16 heavy diagnostics requests (gradients + ablation +
logit lens, a 256-byte prompt) are in flight; client-side inter-token gaps (p50/p99/max) of the streams, their
tokens/s, and the diagnostics' latency. The engine gives jobs at most SHORTCUT_DIAGNOSTICS_SHARE of the worker while
sequences decode, and a job yields after every forward (and every block of the backward pass), so a stream's gap
should stay within 2 x its median plus one forward of the prompt.

The jobs are sent from a client process of their own (as users on other machines would send them), so the process
that timestamps the streams' tokens only reads the streams: reading 16 answers of 10 MB in the streams' event loop
would delay the token timestamps themselves. `same_process=True` (`--same-process`) sends them from the streams'
loop, as before, to show that difference.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.load import RequestResult, _stream_one
from bench.stats import median, percentile

HEAVY = {"gradients": True, "ablation": True, "logit_lens": 3}


# other jobs to put next to the streams (`python -m bench.contention --job export|patching`): a hidden-state export of
# every site of every layer at every position of the prompt (base64), and a patching grid of every layer and position
JOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "diagnostics": ("/diagnostics", HEAVY),
    "export": (
        "/hidden_states",
        {
            "layers": "all",
            "sites": ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"],
            "encoding": "base64",
        },
    ),
    "patching": ("/patching", {"sites": ["resid_pre"]}),
}


def job_payload(job: str, prompt: str) -> tuple[str, dict[str, Any]]:
    """The path and body of one `job` (JOBS) on `prompt`: patching gets the prompt and the same with its first byte
    changed (the same token count)."""
    path, body = JOBS[job]
    if path == "/patching":
        return path, {"clean": prompt, "corrupt": ("A" if prompt[0] != "A" else "B") + prompt[1:], **body}
    return path, {"prompt": prompt, **body}


async def _diagnose(client: httpx.AsyncClient, base_url: str, prompt: str, job: str) -> tuple[float, int]:
    path, payload = job_payload(job, prompt)
    t0 = time.perf_counter()
    resp = await client.post(base_url + path, json=payload)
    return time.perf_counter() - t0, resp.status_code


async def _jobs(base_url: str, prompt: str, job: str, n: int) -> list[tuple[float, int]]:
    """`n` of `job` at once from a client of their own: (seconds, status) each."""
    limits = httpx.Limits(max_connections=n + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=limits, trust_env=False) as client:
        return list(await asyncio.gather(*(_diagnose(client, base_url, prompt, job) for _ in range(n))))


def _jobs_blocking(base_url: str, prompt: str, job: str, n: int) -> list[tuple[float, int]]:
    """`_jobs` on an event loop of its own (run in the jobs' client process)."""
    return asyncio.run(_jobs(base_url, prompt, job, n))


def _ready() -> None:
    """Nothing: waiting for it tells that the jobs' client process has started and imported this module."""


async def _round(
    base_url: str,
    prompts: list[str],
    diag_prompt: str,
    streams: int,
    diags: int,
    max_new_tokens: int,
    job: str = "diagnostics",
    jobs_process: ProcessPoolExecutor | None = None,
) -> tuple[list[RequestResult], list[tuple[float, int]], float]:
    """The streams, next to `diags` of `job` sent from `jobs_process` (a client process of their own), or from this
    event loop when it is None."""
    limits = httpx.Limits(max_connections=streams + diags + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=limits, trust_env=False) as client:
        jobs: list[asyncio.Future[Any]] = []
        if diags and jobs_process is not None:
            fut = jobs_process.submit(_jobs_blocking, base_url, diag_prompt, job, diags)
            jobs = [asyncio.wrap_future(fut)]
        elif diags:
            jobs = [asyncio.ensure_future(_diagnose(client, base_url, diag_prompt, job)) for _ in range(diags)]
        if jobs:
            await asyncio.sleep(0.5)  # the jobs are queued (and one runs) before the streams start
        t0 = time.perf_counter()
        payload = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        results = await asyncio.gather(
            *(_stream_one(client, base_url + "/generate", {"prompt": p, **payload}) for p in prompts[:streams])
        )
        wall = time.perf_counter() - t0
        done = await asyncio.gather(*jobs)
    diag = done[0] if jobs_process is not None and diags else done
    return list(results), list(diag), wall


def _summary(results: list[RequestResult], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    gaps = [1e3 * g for r in ok for g in r.gaps_s]
    return {
        "errors": len(results) - len(ok),
        "tok_s": sum(r.tokens for r in ok) / wall if wall else None,
        "itl_p50_ms": percentile(gaps, 50),
        "itl_p99_ms": percentile(gaps, 99),
        "itl_max_ms": max(gaps) if gaps else None,
    }


def run(
    base_url: str,
    prompts: list[str],
    diag_prompt: str,
    max_new_tokens: int,
    forward_ms: float | None,
    streams: int = 8,
    diags: int = 16,
    job: str = "diagnostics",
    same_process: bool = False,
) -> dict[str, Any]:
    """Both rounds against a running server; `forward_ms` (one forward of the diagnostics prompt) sets the bound.
    `job`: what runs next to the streams (JOBS); `same_process`: the jobs are sent from the streams' event loop
    instead of a client process of their own."""
    alone = _summary(*asyncio.run(_round(base_url, prompts, diag_prompt, streams, 0, max_new_tokens))[::2])
    if same_process:
        results, diag, wall = asyncio.run(_round(base_url, prompts, diag_prompt, streams, diags, max_new_tokens, job))
    else:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(_ready).result(timeout=120)  # started and imported before the round begins
            results, diag, wall = asyncio.run(
                _round(base_url, prompts, diag_prompt, streams, diags, max_new_tokens, job, pool)
            )
    busy = _summary(results, wall)
    latencies = [1e3 * s for s, status in diag if status == 200]
    bound = 2 * busy["itl_p50_ms"] + forward_ms if forward_ms and busy["itl_p50_ms"] else None
    return {
        "streams": streams,
        "diagnostics": diags,
        "job": job,
        "jobs_client": "the streams' process" if same_process else "a process of its own",
        "diagnostics_options": JOBS[job][1],
        "diagnostics_prompt_bytes": len(diag_prompt.encode()),
        "alone": alone,
        "with_diagnostics": busy,
        "diagnostics_ok": len(latencies),
        "diagnostics_p50_ms": median(latencies),
        "diagnostics_max_ms": max(latencies) if latencies else None,
        "gap_bound_ms": bound,
        "forward_ms": forward_ms,
        "p99_within_bound": None if bound is None else busy["itl_p99_ms"] <= bound,
    }


def forward_ms(checkpoint: Path, prompt: str, reps: int = 7) -> float:
    """Median wall ms of one plain reference forward of `prompt` on `checkpoint`'s model, in this process on one
    thread (the server's SHORTCUT_THREADS here): the bound's "one forward of the job's prompt"."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.tokenizer import encode

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_checkpoint(checkpoint).model
        idx = torch.tensor([encode(prompt)], dtype=torch.long)  # (1, T)
        times = []
        with torch.inference_mode():
            model(idx)  # warm-up
            for _ in range(reps):
                t0 = time.perf_counter()
                model(idx)
                times.append(1e3 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.contention --job export`: the shipped checkpoint on a fresh server, 8 streams (64-byte
    prompts, 128 new tokens) alone and next to 16 of the job (a 256-byte prompt), the jobs sent from a client process
    of their own; the bound's forward timed in this process first. Prints the JSON."""
    import argparse
    import json

    from bench.servers import shortcut_server

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--job", choices=sorted(JOBS), default="export")
    p.add_argument("--diags", type=int, default=16)
    p.add_argument("--prompt-bytes", type=int, default=256)
    p.add_argument(
        "--same-process", action="store_true", help="send the jobs from the streams' event loop (the old bench)"
    )
    a = p.parse_args(argv)
    checkpoint = Path(__file__).resolve().parent.parent / "model" / "checkpoints" / "shakespeare.safetensors"
    text = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 8
    prompts = [text[i : i + 64] for i in range(0, 8 * 64, 64)]
    job_prompt = text[: a.prompt_bytes]
    fwd = forward_ms(checkpoint, job_prompt)
    with shortcut_server(checkpoint, threads=1, max_batch_size=32) as server:
        out = run(server.base_url, prompts, job_prompt, 128, fwd, diags=a.diags, job=a.job, same_process=a.same_process)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
