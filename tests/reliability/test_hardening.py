"""Hardening (issue #13): one client must not be able to freeze, starve or fill the server.

Live servers on raw sockets: the API key is checked before any body is read, slow or stalled requests are closed at
their header/body deadline, a connection cap answers 503 in the JSON shape, malformed requests too, running out of
file descriptors is logged once per interval and the server recovers by itself, Host headers are checked, client
values cannot forge log lines, a client that leaves is a 499, and a drain past its deadline ends every request with
a 503 (or an `event: error`) and exits in time.
"""

from __future__ import annotations

import json
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import SLOW_STEP_S
from tests.helpers import ERROR_FIELDS, idle, value, wait_for
from tests.reliability.conftest import Server

KEY = "hardening-key-0123456789"
DEADLINE_S = 1.0  # header and body deadlines of the guarded server
MAX_CONNECTIONS = 4


def error_of(raw: bytes) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body[: int(headers["content-length"])])


def assert_error_body(body: dict, code: str) -> None:
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["code"] == code and body["error"]["message"], body


@contextmanager
def raw_connection(url: str, timeout: float = 15) -> Iterator[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        yield sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture(scope="module")
def guarded(start_server: Callable[..., Server], slow_checkpoint: Path) -> Server:
    """A keyed server with 1 s read deadlines, a cap of 4 connections, INFO logs and a slow decode step."""
    return start_server(
        slow_checkpoint,
        api_key=KEY,
        header_timeout_s=DEADLINE_S,
        body_timeout_s=DEADLINE_S,
        max_connections=MAX_CONNECTIONS,
        log_level="INFO",
        max_batch_size=1,
        step_delay_s=SLOW_STEP_S,
    )


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


# ---------------------------------------------------------------- item 2: key before body, read deadlines


def test_key_is_checked_before_the_body_is_read(guarded: Server) -> None:
    """A keyless client that declares a 1 MB body and sends none gets its 401 at once and the connection closes."""
    with raw_connection(guarded.url) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n"
        )
        raw = read_until_closed(sock)  # before the body deadline closes it: the answer comes first
    status, headers, body = error_of(raw)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert headers["connection"] == "close"
    assert_error_body(body, "missing_api_key")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"",  # connects and sends nothing
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # headers never finished
        b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + KEY.encode()
        + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"text": ',  # body shorter than declared
        b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + KEY.encode()
        + b'\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"t\r\n',  # chunks never end
    ],
    ids=["idle", "half-headers", "short-body", "endless-chunks"],
)
def test_stalled_requests_are_closed_at_their_deadline(guarded: Server, request_bytes: bytes) -> None:
    with raw_connection(guarded.url, timeout=DEADLINE_S + 10) as sock:
        sock.sendall(request_bytes)
        assert read_until_closed(sock) == b""  # closed by the server (a socket.timeout here: it never was)
    assert httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200


def test_headers_over_the_limit_get_the_json_error_shape(guarded: Server) -> None:
    with raw_connection(guarded.url) as sock:
        # a header still growing past h11's 16 KiB limit (the 1 MB header of the issue is refused at the same point)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000)
        raw = read_until_closed(sock)
    status, headers, body = error_of(raw)
    assert status == 400 and headers["content-type"] == "application/json"
    assert_error_body(body, "invalid_http_request")


def test_connection_cap_answers_503_in_the_json_shape(guarded: Server) -> None:
    with ExitStack() as stack:
        for _ in range(MAX_CONNECTIONS):
            stack.enter_context(raw_connection(guarded.url))
        resp = None
        for _ in range(50):  # the idle connections may take a moment to be accepted
            resp = httpx.get(f"{guarded.url}/health", timeout=10)
            if resp.status_code == 503:
                break
            time.sleep(0.02)
        assert resp is not None and resp.status_code == 503, resp
        assert resp.headers["retry-after"] == "1"
        assert_error_body(resp.json(), "too_many_connections")
    for _ in range(200):  # the idle ones are closed: served again
        if httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the server never served again after the idle connections closed")


# ---------------------------------------------------------------- item 5: Host check, log forging, 499


def test_host_header_is_checked(guarded: Server) -> None:
    port = guarded.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        resp = httpx.get(f"{guarded.url}/health", headers={"host": host}, timeout=10)
        assert resp.status_code == 400, host
        assert_error_body(resp.json(), "host_not_allowed")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST"):
        assert httpx.get(f"{guarded.url}/health", headers={"host": host}, timeout=10).status_code == 200, host


def test_client_values_cannot_forge_log_lines(guarded: Server) -> None:
    forged = "2026-11-30 08:00:00,000 INFO shortcut.access: POST /generate 200 1.0ms FORGED"
    path = "/x%0a" + forged.replace(" ", "%20") + "%0d%0a%1b[31m"
    assert httpx.get(f"{guarded.url}{path}", timeout=10).status_code == 404
    deadline = time.monotonic() + 10
    while "FORGED" not in guarded.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in guarded.log().splitlines() if "FORGED" in line]
    assert lines, guarded.log()[-2000:]
    for line in lines:
        assert not line.startswith("2026-11-30 08:00:00"), line
        assert "/x\\n2026-11-30" in line and "\\r\\n\\x1b[31m" in line, line


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"prompt": "gone", "max_new_tokens": 240}),
        ("/v1/completions", {"prompt": "gone", "max_tokens": 240}),
    ],
)
def test_client_that_leaves_is_a_499_not_a_503(guarded: Server, path: str, body: dict) -> None:
    url = guarded.url
    before = wait_for(url, idle)
    aborted = value(before, "shortcut_request_success_total", finished_reason="abort")
    raw = json.dumps(body).encode()
    with raw_connection(url) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw)
        )
        wait_for(url, lambda s: value(s, "shortcut_requests_running") == 1)
    after = wait_for(
        url,
        lambda s: (
            idle(s)
            and value(s, "shortcut_request_success_total", finished_reason="abort") == aborted + 1
            and value(s, "shortcut_http_request_duration_seconds_count", route=path, status="499")
            > value(before, "shortcut_http_request_duration_seconds_count", route=path, status="499")
        ),
    )
    assert value(after, "shortcut_http_request_duration_seconds_count", status="503") == 0
    assert f"POST {path} 499 " in guarded.log()


# ---------------------------------------------------------------- item 2: out of file descriptors


def test_out_of_file_descriptors_is_logged_once_and_recovers(
    start_server: Callable[..., Server], app_checkpoint: Path
) -> None:
    """Idle connections beyond the process's file limit: asyncio's accept errors are logged once per interval (not
    once per attempt), and once the header deadline closes the idle connections /health is served again."""
    server = start_server(app_checkpoint, header_timeout_s=DEADLINE_S)
    pid = server.process.pid
    open_fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds + 6, hard))
    try:
        with ExitStack() as stack:
            for _ in range(24):
                stack.enter_context(raw_connection(server.url))
            time.sleep(1.5)  # accept() fails over and over while the idle connections hold every descriptor
            deadline = time.monotonic() + 40
            while True:  # recovers with the idle connections still open on this side
                try:
                    if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("/health never answered while idle connections were held")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    log = server.log()
    assert 1 <= log.count("out of system resource") <= 2, log[-3000:]


# ---------------------------------------------------------------- item 4: drain past its deadline


def test_drain_past_its_deadline_ends_every_request_with_503(
    start_server: Callable[..., Server], slow_checkpoint: Path
) -> None:
    """SIGTERM with a stream running and a request waiting that cannot finish within the drain timeout: the stream
    ends with an `event: error` (draining), the waiting request gets a JSON 503, no thread dies, and the process exits
    0 within the drain timeout plus a few seconds (not twice the drain timeout)."""
    drain_s = 1.0
    server = start_server(
        slow_checkpoint, max_batch_size=1, drain_timeout_s=drain_s, log_level="INFO", step_delay_s=0.02
    )
    url = server.url
    results: dict[str, object] = {}

    def stream() -> None:
        body = {"prompt": "long", "max_new_tokens": 240, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/generate", json=body) as resp:
            results["stream"] = "".join(resp.iter_text())

    def plain() -> None:
        results["plain"] = httpx.post(f"{url}/generate", json={"prompt": "queued", "max_new_tokens": 240}, timeout=60)

    threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
    threads[0].start()
    wait_for(url, lambda s: value(s, "shortcut_requests_running") == 1)
    threads[1].start()
    wait_for(url, lambda s: value(s, "shortcut_requests_waiting") == 1)
    t0 = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0, server.log()
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(30)
    events = results["stream"]
    assert isinstance(events, str) and "event: error" in events, events[-500:]
    last = [line for line in events.splitlines() if line.startswith("data: ")][-1]
    assert_error_body(json.loads(last[len("data: ") :]), "draining")
    plain_resp = results["plain"]
    assert isinstance(plain_resp, httpx.Response) and plain_resp.status_code == 503, plain_resp
    assert_error_body(plain_resp.json(), "draining")
    log = server.log()
    assert "diagnostics jobs" in log and "drain timed out" in log, log
    assert "Traceback" not in log and "InvalidStateError" not in log, log
    assert elapsed < drain_s + 8, (elapsed, log)  # drain + abort + uvicorn's short grace, not 2 x drain
