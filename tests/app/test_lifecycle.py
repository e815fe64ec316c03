"""Readiness, SIGTERM drain, client disconnects and queue limits (live servers with a slower checkpoint)."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import LiveServer
from tests.conftest import SLOW_STEP_S
from tests.helpers import Samples, assert_error, idle, value, wait_for


def in_flight(s: Samples) -> float:
    return value(s, "shortcut_requests_running") + value(s, "shortcut_requests_waiting")


def post_many(url: str, bodies: list[dict], timeout: float = 60) -> list[httpx.Response]:
    """POST /generate concurrently (released together by a barrier)."""
    barrier = Barrier(len(bodies))

    def one(body: dict) -> httpx.Response:
        barrier.wait()
        return httpx.post(f"{url}/generate", json=body, timeout=timeout)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


# ---------------------------------------------------------------- readiness (in-process)


def test_not_ready_before_startup(app_checkpoint: Path) -> None:
    settings = Settings(
        checkpoint=app_checkpoint,
        model_name="tiny",
        warmup=False,
        threads=1,
        extra_checkpoints_dir=None,
        allowed_hosts="testserver",
    )
    client = TestClient(create_app(settings))  # no `with`: the lifespan (model loading) has not run
    assert_error(client.get("/ready"), 503, code="not_ready")
    assert_error(client.post("/generate", json={"prompt": "hi"}), 503, code="not_ready")
    assert client.get("/health").status_code == 200


def test_ready_then_503_while_draining(client: TestClient) -> None:
    assert client.get("/ready").status_code == 200
    assert client.get("/ready").json() == {"status": "ready"}
    client.app.state.draining = True
    err = assert_error(client.get("/ready"), 503, code="draining")
    assert err["type"] == "service_unavailable"
    assert_error(client.post("/generate", json={"prompt": "hi", "max_new_tokens": 1}), 503, code="draining")
    assert_error(client.post("/v1/completions", json={"prompt": "hi"}), 503, code="draining")
    assert client.get("/health").status_code == 200  # liveness is unaffected
    client.app.state.draining = False
    assert client.get("/ready").status_code == 200


def test_pre_drain_period_fails_ready_but_serves(client: TestClient) -> None:
    """SIGTERM's pre-drain period (SHORTCUT_DRAIN_DELAY_S): /ready is 503 so a balancer stops sending, and what it
    still sends is served."""
    client.app.state.leaving = True
    try:
        assert_error(client.get("/ready"), 503, code="draining")
        assert client.head("/ready").status_code == 503  # balancers probe with HEAD too
        r = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
    finally:
        client.app.state.leaving = False
    assert client.get("/ready").status_code == 200


# ---------------------------------------------------------------- live: one row, one queue slot


@pytest.fixture(scope="module")
def limited(start_server: Callable[..., LiveServer], slow_checkpoint: Path) -> str:
    return start_server(slow_checkpoint, max_batch_size=1, max_queue=1, step_delay_s=SLOW_STEP_S).url


def test_queue_full_is_429(limited: str) -> None:
    wait_for(limited, idle)
    responses = post_many(limited, [{"prompt": f"busy {i}", "max_new_tokens": 120, "seed": i} for i in range(5)])
    rejected = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert rejected and served
    assert len(rejected) + len(served) == 5
    for r in rejected:
        assert_error(r, 429, code="queue_full")
        assert r.headers["retry-after"] == "1"
    for r in served:
        assert r.json()["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 120


def test_client_disconnect_frees_the_slot(limited: str) -> None:
    before = wait_for(limited, idle)
    aborted = value(before, "shortcut_request_success_total", finished_reason="abort")
    generated = value(before, "shortcut_generation_tokens_total")
    body = {"prompt": "disconnect", "max_new_tokens": 240, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{limited}/generate", json=body) as resp:
        assert resp.status_code == 200
        first = next(resp.iter_lines())
        assert first == "event: token"
    # the connection is closed: the sequence must leave the batch without running to 240 tokens
    after = wait_for(
        limited,
        lambda s: idle(s) and value(s, "shortcut_request_success_total", finished_reason="abort") == aborted + 1,
    )
    assert value(after, "shortcut_generation_tokens_total") - generated < 240
    # the only row is free again
    ok = httpx.post(f"{limited}/generate", json={"prompt": "next", "max_new_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_client_disconnect_frees_the_slot(limited: str) -> None:
    before = wait_for(limited, idle)
    aborted = value(before, "shortcut_request_success_total", finished_reason="abort")
    body = json.dumps({"prompt": "gone", "max_new_tokens": 240}).encode()
    host, port = limited.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_for(limited, lambda s: value(s, "shortcut_requests_running") == 1)
    # the socket is closed while the answer is being generated
    after = wait_for(
        limited,
        lambda s: idle(s) and value(s, "shortcut_request_success_total", finished_reason="abort") == aborted + 1,
    )
    assert value(after, "shortcut_request_success_total", finished_reason="length") == value(
        before, "shortcut_request_success_total", finished_reason="length"
    )


# ---------------------------------------------------------------- live: SIGTERM drain


def test_sigterm_drains_in_flight_requests(start_server: Callable[..., LiveServer], slow_checkpoint: Path) -> None:
    """SIGTERM: /ready turns 503, new work is refused, running and queued requests finish, then exit code 0."""
    server = start_server(
        slow_checkpoint,
        max_batch_size=1,
        drain_timeout_s=60,
        drain_delay_s=0,  # 0: the drain starts at once, as before the delay existed
        log_level="INFO",
        step_delay_s=SLOW_STEP_S,
    )
    url, n = server.url, 4

    def accepted_and_queued(s: Samples) -> bool:
        return (
            value(s, "shortcut_request_success_total") + in_flight(s) == n
            and value(s, "shortcut_requests_waiting") >= 1
        )

    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(
                httpx.post, f"{url}/generate", json={"prompt": f"drain {i}", "max_new_tokens": 100}, timeout=120
            )
            for i in range(n)
        ]
        wait_for(url, accepted_and_queued)  # every request accepted; one running, at least one queued
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:
            assert_error(httpx.get(f"{url}/ready", timeout=10), 503, code="draining")
            late = httpx.post(f"{url}/generate", json={"prompt": "too late", "max_new_tokens": 2}, timeout=10)
            assert_error(late, 503, code="draining")
        except httpx.TransportError:  # already gone: only acceptable if the drain really finished
            assert all(f.done() for f in futures)
        responses = [f.result() for f in futures]
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.json()["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 100
    assert server.process.wait(timeout=90) == 0, server.log()
    assert "drain complete" in server.log()  # not "timed out": nothing was cut short
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/ready", timeout=2)


def test_sigterm_pre_drain_delay_then_drain(start_server: Callable[..., LiveServer], slow_checkpoint: Path) -> None:
    """SIGTERM with SHORTCUT_DRAIN_DELAY_S: for that long /ready is 503 while new requests are still served (a
    balancer's checks take the server out before anything is refused); then the drain as before: new work 503, the
    running request finishes with 200, exit 0."""
    delay = 4.0
    server = start_server(
        slow_checkpoint,
        max_batch_size=2,
        drain_timeout_s=60,
        drain_delay_s=delay,
        log_level="INFO",
        step_delay_s=0.05,  # the long request below runs ~10 s: through the delay and into the drain
    )
    url = server.url
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(httpx.post, f"{url}/generate", json={"prompt": "long", "max_new_tokens": 200}, timeout=120)
        wait_for(url, lambda s: value(s, "shortcut_requests_running") == 1)
        t_signal = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        deadline = t_signal + delay + 30
        while httpx.get(f"{url}/ready", timeout=10).status_code == 200:  # the signal reaches the app
            assert time.monotonic() < deadline, "/ready never turned 503 after SIGTERM"
            time.sleep(0.02)
        assert_error(httpx.get(f"{url}/ready", timeout=10), 503, code="draining")
        served = 0
        while True:  # new requests are served until the delay ends, then refused
            r = httpx.post(f"{url}/generate", json={"prompt": "still", "max_new_tokens": 1}, timeout=60)
            if r.status_code != 200:
                t_refused = time.monotonic()
                assert_error(r, 503, code="draining")
                break
            served += 1
            assert time.monotonic() < deadline, "new requests were still served long after the drain delay"
        assert served >= 1, "the first request after /ready turned 503 was refused: no pre-drain period"
        assert t_refused - t_signal >= delay  # the drain began no earlier than the delay after the signal
        assert not long.done()  # still running: the drain waits for it
        assert_error(httpx.get(f"{url}/ready", timeout=10), 503, code="draining")
        r = long.result()
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 200
    assert server.process.wait(timeout=90) == 0, server.log()
    log = server.log()
    assert "SHORTCUT_DRAIN_DELAY_S" in log and "drain complete" in log
