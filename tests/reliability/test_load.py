"""Load: 64 concurrent clients send a mix of /generate (plain and streamed), /v1/completions and /diagnostics to a
live server. Every answer is exactly what the same request gets alone (seeded sampling with temperature > 0, so a
token from another sequence would show), or a 429; memory after the run stays within 10% of after a warm-up round.

Bounded: 200 requests in all (8 solo references, a 64-request warm-up, 128 under load), each round at most 60 s.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.helpers import scrape, value
from tests.reliability.conftest import Server

CLIENTS = 64
PER_CLIENT = 2  # requests per client in the measured round
ROUND_TIMEOUT_S = 60
# (prompt, seed, max_new_tokens): prompt + tokens fit the 64-token window; lengths differ so rows leave at
# different steps and the engine moves rows around in the KV cache
SPECS = [(f"Request {i}: once upon a time", 1000 + i, 8 + 3 * i) for i in range(6)]
DIAG_PROMPTS = ["to be or not to be", "a stitch in time"]
KINDS = ("generate", "stream", "completions", "diagnostics")
SAMPLING = {"temperature": 0.9, "top_p": 0.95}


def job(client: int, k: int) -> tuple[str, int]:
    """The kind and spec index of a client's k-th request (deterministic, covers every pair)."""
    return KINDS[(client + k) % len(KINDS)], (client * 5 + k) % len(SPECS)


async def run_one(http: httpx.AsyncClient, kind: str, i: int) -> tuple[int, Any]:
    """Send one request; return (status, comparable result): the generated text, or the diagnostics JSON."""
    prompt, seed, n = SPECS[i]
    if kind == "diagnostics":
        resp = await http.get("/diagnostics", params={"prompt": DIAG_PROMPTS[i % 2], "logit_lens": 2})
        return resp.status_code, resp.json()
    if kind == "completions":
        resp = await http.post("/v1/completions", json={"prompt": prompt, "seed": seed, "max_tokens": n, **SAMPLING})
        body = resp.json()
        if resp.status_code != 200:
            return resp.status_code, body
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == n
        return 200, body["choices"][0]["text"]
    payload = {"prompt": prompt, "seed": seed, "max_new_tokens": n, **SAMPLING}
    if kind == "generate":
        resp = await http.post("/generate", json=payload)
        body = resp.json()
        if resp.status_code != 200:
            return resp.status_code, body
        assert body["usage"]["completion_tokens"] == n and body["seed"] == seed
        return 200, body["text"]
    async with http.stream("POST", "/generate", json={**payload, "stream": True}) as resp:
        if resp.status_code != 200:
            return resp.status_code, json.loads(await resp.aread())
        pieces, done = [], None
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
                assert data["type"] in ("token", "done"), data  # an `error` event is a failure
                if data["type"] == "token":
                    pieces.append(data["text"])
                else:
                    done = data
        assert done is not None and done["usage"]["completion_tokens"] == n
        assert "".join(pieces) == done["text"]  # the streamed pieces add up to the final text
        return 200, done["text"]


async def run_round(url: str, requests_per_client: int) -> list[tuple[str, int, int, Any]]:
    """CLIENTS concurrent clients, each sending its requests one after another; (kind, spec, status, result)."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=ROUND_TIMEOUT_S, limits=limits) as http:
        start = asyncio.Event()

        async def client(c: int) -> list[tuple[str, int, int, Any]]:
            await start.wait()
            out = []
            for k in range(requests_per_client):
                kind, i = job(c, k)
                status, result = await run_one(http, kind, i)
                out.append((kind, i, status, result))
            return out

        tasks = [asyncio.create_task(client(c)) for c in range(CLIENTS)]
        start.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks), ROUND_TIMEOUT_S)
    return [r for rs in done for r in rs]


def check(results: list[tuple[str, int, int, Any]], solo: dict[tuple[str, int], Any]) -> int:
    """Every result equals the solo answer, or is a well-formed 429; return the number of 200s."""
    ok = 0
    for kind, i, status, result in results:
        if status == 429:
            assert set(result) == {"error"} and result["error"]["code"] == "queue_full", result
            continue
        assert status == 200, (kind, i, status, result)
        key = ("diagnostics", i % 2) if kind == "diagnostics" else ("text", i)
        assert result == solo[key], (kind, i, result, solo[key])
        ok += 1
    return ok


@pytest.mark.timeout(240)
def test_concurrent_mixed_load(tiny_server: Server) -> None:
    url = tiny_server.url

    async def solo_answers() -> dict[tuple[str, Any], Any]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            out: dict[tuple[str, Any], Any] = {}
            for i in range(len(SPECS)):
                status, out[("text", i)] = await run_one(http, "generate", i)
                assert status == 200
            for j in range(len(DIAG_PROMPTS)):
                status, out[("diagnostics", j)] = await run_one(http, "diagnostics", j)
                assert status == 200
            return out

    solo = asyncio.run(solo_answers())
    assert len({solo[("text", i)] for i in range(len(SPECS))}) == len(SPECS)  # distinct answers: mix-ups would show

    warm = asyncio.run(run_round(url, 1))
    assert check(warm, solo) >= len(warm) // 2
    rss_warm = tiny_server.rss_bytes()
    before = scrape(url)

    loaded = asyncio.run(run_round(url, PER_CLIENT))
    assert len(loaded) == CLIENTS * PER_CLIENT
    assert {kind for kind, *_ in loaded} == set(KINDS)
    assert check(loaded, solo) >= len(loaded) // 2
    rss_after = tiny_server.rss_bytes()
    assert rss_after <= rss_warm * 1.10, (rss_warm, rss_after)

    metrics = scrape(url)
    assert value(metrics, "shortcut_requests_running") == 0
    assert value(metrics, "shortcut_requests_waiting") == 0

    # the clients really overlapped: some decode steps ran several sequences at once
    def delta(name: str, **labels: str) -> float:
        return value(metrics, name, **labels) - value(before, name, **labels)

    steps = delta("shortcut_batch_size_count")
    assert steps - delta("shortcut_batch_size_bucket", le="1.0") > 0.1 * steps
    assert steps - delta("shortcut_batch_size_bucket", le="4.0") > 0
    assert tiny_server.process.poll() is None
