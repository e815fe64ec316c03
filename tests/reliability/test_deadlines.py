"""The connection deadlines, timed (issue #30): a client that drips bytes is closed at its deadline, not kept open by
each byte; the header deadline runs from a request's first byte and the body deadline from its headers, and the two
differ here (1 s and 2.5 s) so that mixing them up shows.

Live server on raw sockets (app/connection.py: uvicorn's h11 protocol has no deadlines of its own). The slack allows
for a busy machine; the deadlines are the point, so a close earlier than its deadline fails too.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.conftest import Server

HEADER_S, BODY_S = 1.0, 2.5
SLACK_S = 0.6  # the server's event loop on a shared machine; a re-armed deadline never closes while bytes drip
EARLY_S = 0.05  # the server's clock starts when it accepts, a hair after the client's
DRIP_EVERY_S = 0.1
GIVE_UP_S = BODY_S + 4.0


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Server], app_checkpoint: Path) -> Server:
    return start_server(app_checkpoint, header_timeout_s=HEADER_S, body_timeout_s=BODY_S)


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def drip_until_closed(sock: socket.socket, first: bytes, drip: bytes = b"a") -> tuple[float, bytes]:
    """Send `first`, then one byte of `drip` every DRIP_EVERY_S; (seconds from `first` until the server closed the
    connection, what it sent before). Fails if it is still open after GIVE_UP_S."""
    start = time.monotonic()
    sock.sendall(first)
    received = b""
    while time.monotonic() - start < GIVE_UP_S:
        sock.settimeout(DRIP_EVERY_S)
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return time.monotonic() - start, received
            received += chunk
            continue
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - start, received
        try:
            sock.sendall(drip)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start, received
    pytest.fail(f"the connection was still open after {GIVE_UP_S} s of dripping (received {received[:200]!r})")


def assert_closed_at(elapsed: float, deadline: float) -> None:
    assert deadline - EARLY_S <= elapsed <= deadline + SLACK_S, f"closed after {elapsed:.2f} s, deadline {deadline} s"


def test_dripped_headers_are_closed_at_the_header_deadline(server: Server) -> None:
    """A header line that grows by a byte every 0.1 s: closed HEADER_S after the first byte."""
    with connect(server) as sock:
        elapsed, got = drip_until_closed(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
    assert got == b""
    assert_closed_at(elapsed, HEADER_S)


def test_dripped_body_is_closed_at_the_body_deadline(server: Server) -> None:
    """Headers at once, then a declared 1000-byte body a byte every 0.1 s: closed BODY_S after the headers (not at
    the header deadline, and not never)."""
    head = (
        b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"text": "'
    )
    with connect(server) as sock:
        elapsed, got = drip_until_closed(sock, head)
    assert got == b""
    assert_closed_at(elapsed, BODY_S)


def test_the_next_requests_header_deadline_runs_from_its_first_byte(server: Server) -> None:
    """On a kept-alive connection, idle past HEADER_S between requests (uvicorn's keep-alive timeout applies there),
    the second request's dripped headers are closed HEADER_S after their first byte."""
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_S + 0.5)
        elapsed, got = drip_until_closed(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
    assert got == b""
    assert_closed_at(elapsed, HEADER_S)
