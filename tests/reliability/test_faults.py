"""Faults: per-request timeouts, clients that vanish (while running or while queued), SIGTERM with streams in flight.

tests/app/test_lifecycle.py covers the plain cases (a /generate stream dropped while running, a non-streaming
/generate drained on SIGTERM); these add the OpenAI route, the waiting queue, streaming drains and timeouts.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from model.decode import FastDecoder
from model.fast import FusedDecoder
from tests.conftest import SLOW_STEP_S
from tests.helpers import ERROR_FIELDS, idle, parse_metrics, value, wait_for
from tests.reliability.conftest import Server
from tests.slow_app import hold_each_step


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order.

    SSE lines end at CR/LF only: str.splitlines() would also split inside a payload at U+0085 or U+2028, which
    generated text may contain (JSON leaves them unescaped).
    """
    return [line[len("data: ") :] for line in text.replace("\r\n", "\n").split("\n") if line.startswith("data: ")]


def assert_standard_error(err: dict, code: str) -> None:
    assert set(err) == {"error"} and set(err["error"]) == ERROR_FIELDS, err
    assert err["error"]["code"] == code and err["error"]["message"], err


# ---------------------------------------------------------------- request timeout (in-process, slower model)


def test_request_timeout_is_504_and_frees_the_slot(
    make_client: Callable[..., TestClient], slow_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200 steps of at least 1 ms each cannot beat a 50 ms deadline on any machine
    for step_class in (FastDecoder, FusedDecoder):  # whichever the engine picks
        monkeypatch.setattr(step_class, "__call__", hold_each_step(step_class.__call__, 0.001))
    client = make_client(slow_checkpoint, request_timeout_s=0.05, max_batch_size=1)
    engine = client.app.state.models["tiny"].engine
    long = {"prompt": "a slow one", "max_new_tokens": 200}

    resp = client.post("/generate", json=long)
    assert resp.status_code == 504, resp.text
    assert_standard_error(resp.json(), "request_timeout")
    assert resp.json()["error"]["type"] == "timeout_error"

    resp = client.post("/v1/completions", json={"prompt": "a slow one", "max_tokens": 200})
    assert resp.status_code == 504
    assert_standard_error(resp.json(), "request_timeout")

    stream = client.post("/generate", json={**long, "stream": True})
    assert stream.status_code == 200  # headers went out before the deadline; the error arrives as the last event
    assert stream.text.rstrip().split("\n")[-2] == "event: error"
    assert_standard_error(json.loads(sse_data(stream.text)[-1]), "request_timeout")

    chunks = sse_data(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True}).text)
    assert chunks[-1] == "[DONE]"
    assert_standard_error(json.loads(chunks[-2]), "request_timeout")

    # every slot is free again and each timeout was counted once
    assert engine.n_running == 0 and engine.n_waiting == 0
    text = parse_metrics(client.get("/metrics").text)
    assert value(text, "shortcut_requests_running") == 0 and value(text, "shortcut_requests_waiting") == 0
    assert value(text, "shortcut_request_success_total", finished_reason="timeout") == 4
    assert value(text, "shortcut_generation_tokens_total") < 4 * 200


def test_extreme_sampling_values_do_not_fail_other_requests(
    make_client: Callable[..., TestClient], slow_checkpoint: Path
) -> None:
    """Values at the edge of the schema (a subnormal temperature, a top_p that rounds to 0 in float32) are served,
    and a sequence already running in the same batch is not disturbed."""
    client = make_client(slow_checkpoint, max_batch_size=4)
    engine = client.app.state.models["tiny"].engine
    with ThreadPoolExecutor(1) as pool:
        victim = pool.submit(client.post, "/generate", json={"prompt": "victim", "max_new_tokens": 250, "seed": 1})
        deadline = time.monotonic() + 30
        while engine.n_running == 0 and not victim.done() and time.monotonic() < deadline:
            time.sleep(0.005)
        for extreme in ({"temperature": 1e-40}, {"top_p": 1e-300}, {"temperature": 1e-40, "top_p": 1e-300}):
            resp = client.post("/generate", json={"prompt": "edge", "max_new_tokens": 3, **extreme})
            assert resp.status_code == 200, (extreme, resp.text)
        done = victim.result()
    assert done.status_code == 200, done.text
    assert done.json()["finish_reason"] == "length" and done.json()["usage"]["completion_tokens"] == 250


# ---------------------------------------------------------------- client disconnects (live, one batch row)


def test_completions_stream_disconnect_frees_the_row(slow_server: Server) -> None:
    url = slow_server.url
    before = wait_for(url, idle)
    aborted = value(before, "shortcut_request_success_total", finished_reason="abort")
    tokens = value(before, "shortcut_generation_tokens_total")
    body = {"prompt": "go away", "max_tokens": 240, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        first = next(line for line in resp.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: ") :])["choices"][0]["finish_reason"] is None
    after = wait_for(
        url, lambda t: idle(t) and value(t, "shortcut_request_success_total", finished_reason="abort") == aborted + 1
    )
    assert value(after, "shortcut_generation_tokens_total") - tokens < 240
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "next", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_disconnect_while_queued_leaves_the_queue(slow_server: Server) -> None:
    url = slow_server.url
    before = wait_for(url, idle)
    aborted = value(before, "shortcut_request_success_total", finished_reason="abort")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            httpx.post, f"{url}/generate", json={"prompt": "hold the row", "max_new_tokens": 240}, timeout=60
        )
        wait_for(url, lambda t: value(t, "shortcut_requests_running") == 1)
        # the only row is busy: this request waits in the queue, then its client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/generate", json={"prompt": "impatient", "max_new_tokens": 5}, timeout=0.15)
        gone = wait_for(
            url,
            lambda t: (
                value(t, "shortcut_requests_waiting") == 0
                and value(t, "shortcut_request_success_total", finished_reason="abort") == aborted + 1
            ),
        )
        assert value(gone, "shortcut_requests_running") == 1 or running.done()  # the first one was not disturbed
        first = running.result()
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 240
    wait_for(url, idle)


# ---------------------------------------------------------------- SIGTERM drain with streams in flight


def test_sigterm_drains_streams(start_server: Callable[..., Server], slow_checkpoint: Path) -> None:
    server = start_server(
        slow_checkpoint, max_batch_size=1, drain_timeout_s=60, log_level="INFO", step_delay_s=SLOW_STEP_S
    )
    url, n_new = server.url, 240
    results: dict[str, httpx.Response | str] = {}
    started = threading.Barrier(4)

    def stream(name: str, path: str, body: dict) -> None:
        with httpx.Client(timeout=90) as http, http.stream("POST", f"{url}{path}", json=body) as resp:
            started.wait(60)
            results[name] = "".join(resp.iter_text()) if resp.status_code == 200 else f"HTTP {resp.status_code}"

    def plain(name: str, path: str, body: dict) -> None:
        started.wait(60)
        results[name] = httpx.post(f"{url}{path}", json=body, timeout=90)

    jobs = [
        (stream, "gen-stream", "/generate", {"prompt": "drain a", "max_new_tokens": n_new, "stream": True}),
        (stream, "cmpl-stream", "/v1/completions", {"prompt": "drain b", "max_tokens": n_new, "stream": True}),
        (plain, "cmpl", "/v1/completions", {"prompt": "drain c", "max_tokens": n_new}),
    ]  # one runs, two wait (one batch row); the SIGTERM comes while all three are in flight
    threads = [threading.Thread(target=f, args=args) for f, *args in jobs]
    for t in threads:
        t.start()
    started.wait(60)
    wait_for(url, lambda t: value(t, "shortcut_requests_running") + value(t, "shortcut_requests_waiting") == 3)
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert server.process.wait(timeout=60) == 0, server.log()

    events = results["gen-stream"]
    assert isinstance(events, str) and "event: error" not in events, events
    done = json.loads(sse_data(events)[-1])
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == n_new
    chunks = sse_data(results["cmpl-stream"])
    assert chunks[-1] == "[DONE]" and json.loads(chunks[-2])["choices"][0]["finish_reason"] == "length"
    assert all("error" not in json.loads(c) for c in chunks[:-1])
    assert "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1]) != ""
    plain_resp = results["cmpl"]
    assert plain_resp.status_code == 200 and plain_resp.json()["usage"]["completion_tokens"] == n_new
    assert "drain complete" in server.log()
