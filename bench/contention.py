"""Streams next to heavy /diagnostics: how much a burst of diagnostics jobs slows running token streams.

8 streaming clients alone, then the same 8 streams while 16 heavy diagnostics requests (gradients + ablation +
logit lens, a 256-byte prompt) are in flight; client-side inter-token gaps (p50/p99/max) of the streams, their
tokens/s, and the diagnostics' latency. The engine gives jobs at most SHORTCUT_DIAGNOSTICS_SHARE of the worker while
sequences decode, and a job yields after every forward (and every block of the backward pass), so a stream's gap
should stay within 2 x its median plus one forward of the prompt.
"""

from __future__ import annotations

import asyncio
import time
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


async def _round(
    base_url: str,
    prompts: list[str],
    diag_prompt: str,
    streams: int,
    diags: int,
    max_new_tokens: int,
    job: str = "diagnostics",
) -> tuple[list[RequestResult], list[tuple[float, int]], float]:
    limits = httpx.Limits(max_connections=streams + diags + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=limits, trust_env=False) as client:
        jobs = [asyncio.ensure_future(_diagnose(client, base_url, diag_prompt, job)) for _ in range(diags)]
        if jobs:
            await asyncio.sleep(0.5)  # the jobs are queued (and one runs) before the streams start
        t0 = time.perf_counter()
        payload = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        results = await asyncio.gather(
            *(_stream_one(client, base_url + "/generate", {"prompt": p, **payload}) for p in prompts[:streams])
        )
        wall = time.perf_counter() - t0
        diag = await asyncio.gather(*jobs)
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
) -> dict[str, Any]:
    """Both rounds against a running server; `forward_ms` (one forward of the diagnostics prompt) sets the bound.
    `job`: what runs next to the streams (JOBS)."""
    alone = _summary(*asyncio.run(_round(base_url, prompts, diag_prompt, streams, 0, max_new_tokens))[::2])
    results, diag, wall = asyncio.run(_round(base_url, prompts, diag_prompt, streams, diags, max_new_tokens, job))
    busy = _summary(results, wall)
    latencies = [1e3 * s for s, status in diag if status == 200]
    bound = 2 * busy["itl_p50_ms"] + forward_ms if forward_ms and busy["itl_p50_ms"] else None
    return {
        "streams": streams,
        "diagnostics": diags,
        "job": job,
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


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.contention --job export`: the shipped checkpoint on a fresh server, 8 streams (64-byte
    prompts, 128 new tokens) alone and next to 16 of the job (a 256-byte prompt); prints the JSON."""
    import argparse
    import json

    from bench.servers import shortcut_server

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--job", choices=sorted(JOBS), default="export")
    p.add_argument("--diags", type=int, default=16)
    p.add_argument("--prompt-bytes", type=int, default=256)
    a = p.parse_args(argv)
    checkpoint = Path(__file__).resolve().parent.parent / "model" / "checkpoints" / "shakespeare.safetensors"
    text = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 8
    prompts = [text[i : i + 64] for i in range(0, 8 * 64, 64)]
    with shortcut_server(checkpoint, threads=1, max_batch_size=32) as server:
        out = run(server.base_url, prompts, text[: a.prompt_bytes], 128, None, diags=a.diags, job=a.job)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
