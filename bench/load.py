"""Closed-loop HTTP load: N concurrent clients, each sending its requests one after another.

Streaming requests are timed per SSE event as it arrives at the client: time to first token (send -> first
`token` event) and inter-token latency (gap between consecutive `token` events of one request).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.stats import percentile, rate


@dataclass
class RequestResult:
    """One request as the client saw it."""

    t_send: float
    t_done: float = 0.0
    tokens: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    error: str | None = None


async def _stream_one(client: httpx.AsyncClient, url: str, payload: dict) -> RequestResult:
    res = RequestResult(t_send=time.perf_counter())
    last: float | None = None
    event = ""
    async with client.stream("POST", url, json={**payload, "stream": True}) as resp:
        if resp.status_code != 200:
            res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            res.t_done = time.perf_counter()
            return res
        async for line in resp.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                now = time.perf_counter()
                if event == "token":
                    res.tokens += 1
                    if last is None:
                        res.ttft_s = now - res.t_send
                    else:
                        res.gaps_s.append(now - last)
                    last = now
                elif event == "done":
                    done = json.loads(line[6:])
                    if done["usage"]["completion_tokens"] != res.tokens:
                        res.error = f"{res.tokens} token events but usage says {done['usage']['completion_tokens']}"
                elif event == "error":
                    res.error = line[6:200]
    res.t_done = time.perf_counter()
    return res


async def _plain_one(client: httpx.AsyncClient, url: str, payload: dict) -> RequestResult:
    res = RequestResult(t_send=time.perf_counter())
    resp = await client.post(url, json=payload)
    res.t_done = time.perf_counter()
    if resp.status_code != 200:
        res.error = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
        return res
    body = resp.json()
    res.tokens = body["usage"]["completion_tokens"] if "usage" in body else body["completion_tokens"]
    return res


async def _load(
    base_url: str,
    prompts: list[str],
    max_new_tokens: int,
    concurrency: int,
    requests_per_client: int,
    stream: bool,
    timeout_s: float,
) -> tuple[list[RequestResult], float]:
    url = base_url + "/generate"
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, trust_env=False) as client:

        async def client_loop(c: int) -> list[RequestResult]:
            out = []
            for r in range(requests_per_client):
                prompt = prompts[(c * requests_per_client + r) % len(prompts)]
                payload = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.0}
                one = _stream_one if stream else _plain_one
                try:
                    out.append(await one(client, url, payload))
                except httpx.HTTPError as e:
                    out.append(
                        RequestResult(
                            t_send=time.perf_counter(), t_done=time.perf_counter(), error=f"{type(e).__name__}: {e}"
                        )
                    )
            return out

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall


def run_load(
    base_url: str,
    prompts: list[str],
    max_new_tokens: int,
    concurrency: int,
    requests_per_client: int = 1,
    stream: bool = True,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Run the load and summarise it: aggregate tokens/s, TTFT and inter-token latency percentiles (ms)."""
    results, wall = asyncio.run(
        _load(base_url, prompts, max_new_tokens, concurrency, requests_per_client, stream, timeout_s)
    )
    return summarize(results, wall, concurrency)


def summarize(results: list[RequestResult], wall_s: float, concurrency: int) -> dict[str, Any]:
    """Aggregate numbers of one load run."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    ms = 1e3

    def pct(xs: list[float], q: float) -> float | None:
        v = percentile(xs, q)
        return None if v is None else ms * v

    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error is not None), None),
        "completion_tokens": tokens,
        "wall_s": wall_s,
        "tok_s": rate(tokens, wall_s),
        "e2e_p50_ms": pct([r.t_done - r.t_send for r in ok], 50),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
    }
