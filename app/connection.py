"""The HTTP connection layer under the app: read and write deadlines, a connection cap (with eviction of idle and
unauthenticated connections for a keyed request) and a per-address cap, the header size limit, JSON for malformed
requests, and asyncio's accept-loop errors logged once per interval (uvicorn's h11 protocol has no header, body or
write deadline of its own)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
import time
from typing import Any

import h11
from pydantic import SecretStr
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.auth import check_authorization
from app.errors import error_body

log = logging.getLogger(__name__)


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (another C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps what a burst freed otherwise): after a connection
    that held an answer's backlog is aborted, so its memory goes back, not only back to the allocator."""
    if _TRIM is not None:
        _TRIM(0)


MAX_HEADER_BYTES = 16 * 1024  # the request line and the header fields (h11's limit while they arrive)


def _json_error(status: int, message: str, code: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(error_body(status, message, code=code)).encode()
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ], body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines and connection caps (the class attributes, set by `guarded_protocol`).

    - a request's headers must arrive within `header_timeout_s` of its first byte (of the connection, for the first
      request; of its first buffered byte, for a pipelined one), its body within `body_timeout_s` of its headers;
      past either the connection is closed (the app sees a disconnect). An idle keep-alive connection is closed by
      uvicorn's keep-alive timeout as before.
    - while the transport's writing is paused (the client reads nothing and the buffers are full) for
      `write_timeout_s`, the connection is aborted: its unsent bytes are dropped, the app sees a disconnect (the
      stream's rows are cancelled, the access log says 499).
    - a connection from an address that already has `max_per_address` open (0: no limit) gets a JSON 503 and is
      closed at once.
    - a request arriving while more than `max_connections` connections are open first evicts the oldest connection
      with no request in flight (never-authenticated ones first) when it carries the valid API key (any complete
      request when no key is set); when there is none to evict it gets a JSON 503 and the connection is closed.
    - a request line and headers over 16 KiB get a JSON 431 (h11 refuses them with a 400 only while they arrive).
    - a malformed request (or headers over h11's 16 KiB limit) gets the JSON error shape instead of plain text.
    """

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    write_timeout_s = 30.0
    max_connections = 512
    max_per_address = 0
    api_key: SecretStr | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" | "body" while a deadline runs
        self._write_deadline: asyncio.TimerHandle | None = None
        self._opened = self.loop.time()
        self._authenticated = False  # a request on it carried the key (or, with no key set, any request arrived)
        app = self.app

        async def capped(scope: dict, receive: Any, send: Any) -> None:
            if _header_bytes(scope) > MAX_HEADER_BYTES:
                await _send_json(send, 431, "request line and headers exceed 16 KiB", "headers_too_large")
                return
            keyed = self._keyed(scope)
            self._authenticated = self._authenticated or keyed
            if len(self.connections) > self.max_connections and not (keyed and self._evict_one()):
                await _send_json(
                    send, 503, "too many open connections; retry shortly", "too_many_connections", retry_after=True
                )
                return
            await app(scope, receive, send)

        self.app = capped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_per_address and self.client is not None:
            host = self.client[0]
            same = sum(1 for c in self.connections if (getattr(c, "client", None) or ("",))[0] == host)
            if same > self.max_per_address:
                log.warning("refused a connection from %s: %d open (SHORTCUT_MAX_CONNECTIONS_PER_ADDRESS)", host, same)
                headers, body = _json_error(
                    503,
                    f"too many open connections from your address (at most {self.max_per_address}: the server's "
                    "SHORTCUT_MAX_CONNECTIONS_PER_ADDRESS); close idle ones or retry shortly",
                    "too_many_connections_from_address",
                )
                # (before any request: h11 sends no response yet, so the bytes are written as they are)
                head = b"".join(k + b": " + v + b"\r\n" for k, v in [*headers, (b"retry-after", b"1")])
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\n" + head + b"\r\n" + body)
                transport.close()
                return
        self._arm("headers", self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_write()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow(receiving=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request already received
        self._follow(receiving=False)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.write_timeout_s, self._write_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm_write()

    def _keyed(self, scope: dict) -> bool:
        """Whether this request carries the API key (every complete request does when no key is set)."""
        if self.api_key is None:
            return True
        value = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        return check_authorization(None if value is None else value.decode("latin-1"), self.api_key) is None

    def _evictable(self) -> bool:
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

    def _evict_one(self) -> bool:
        """Abort the oldest connection with no request in flight, never-authenticated ones first; False if none."""
        others = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)]
        victims = sorted((c for c in others if c._evictable()), key=lambda c: (c._authenticated, c._opened))
        if not victims:
            return False
        victim = victims[0]
        log.info("connection cap reached: closed the oldest idle connection (from %s)", (victim.client or ("-",))[0])
        victim.transport.abort()
        return True

    def _follow(self, receiving: bool) -> None:
        """Arm the deadline of what the client is sending now: headers, a body, or nothing."""
        state = self.conn.their_state
        if state is h11.IDLE:  # (part of) the next request's headers: they must all arrive in time
            if receiving and self._phase is None:
                self._arm("headers", self.header_timeout_s)
            elif not receiving:
                if self.conn.trailing_data[0]:  # a pipelined request, partly received: its headers are due
                    self._unset_keepalive_if_required()
                    self._arm("headers", self.header_timeout_s)
                else:
                    self._disarm()  # idle between requests: uvicorn's keep-alive timeout applies
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.body_timeout_s)
        else:  # the whole request is in (or the connection is done)
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        headers, body = _json_error(
            400, "invalid HTTP request: malformed, or headers over 16 KiB", "invalid_http_request"
        )
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase, self._deadline = phase, self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._phase = None

    def _disarm_write(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
        self._write_deadline = None

    def _expire(self) -> None:
        self._deadline = self._phase = None
        if not self.transport.is_closing():
            self.transport.close()

    def _write_expired(self) -> None:
        """The client read nothing for write_timeout_s: drop what is unsent (close() would wait for it forever)."""
        self._write_deadline = None
        log.info(
            "closed a connection from %s: it read nothing of its answer for %g s (SHORTCUT_WRITE_TIMEOUT_S)",
            (self.client or ("-",))[0],
            self.write_timeout_s,
        )
        self.transport.abort()
        self.loop.call_later(1.0, release_memory)  # once the cancelled rows' events are dropped


def _header_bytes(scope: dict) -> int:
    """The size of a request's line and header fields as sent (name: value CRLF), give or take the line's spaces."""
    line = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + len(scope.get("method", "")) + 12
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))


async def _send_json(send: Any, status: int, message: str, code: str, retry_after: bool = False) -> None:
    headers, body = _json_error(status, message, code)
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(
    header_timeout_s: float,
    body_timeout_s: float,
    max_connections: int,
    *,
    write_timeout_s: float = 30.0,
    max_per_address: int = 0,
    api_key: SecretStr | None = None,
) -> type[H11Protocol]:
    """A GuardedH11Protocol class with these limits, for uvicorn.Config(http=...)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
            "write_timeout_s": write_timeout_s,
            "max_per_address": max_per_address,
            "api_key": api_key,
        },
    )


class LoopErrorLog:
    """An asyncio exception handler that logs each kind of error (its message) at most once per `interval_s`.

    When file descriptors run out, asyncio reports every failed accept (up to the listen backlog per loop tick);
    logged one by one that is megabytes a minute. The first of each interval is logged in full, the rest counted."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        key = str(context.get("message", ""))
        now = time.monotonic()
        if key in self._last and now - self._last[key] < self.interval_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        if skipped:
            context = {**context, "message": f"{key} ({skipped} more since the last report, not logged)"}
        loop.default_exception_handler(context)
