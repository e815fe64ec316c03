"""The HTTP connection layer under the app: read deadlines, a connection cap, JSON for malformed requests, and
asyncio's accept-loop errors logged once per interval (uvicorn's h11 protocol has no header or body deadline)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.errors import error_body

log = logging.getLogger(__name__)


def _json_error(status: int, message: str, code: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(error_body(status, message, code=code)).encode()
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ], body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines and a connection cap (the class attributes, set by `guarded_protocol`).

    - a request's headers must arrive within `header_timeout_s` of its first byte (of the connection, for the first
      request), its body within `body_timeout_s` of its headers; past either the connection is closed (the app sees
      a disconnect). An idle keep-alive connection is closed by uvicorn's keep-alive timeout as before.
    - a request arriving while more than `max_connections` connections are open gets a JSON 503 and the connection
      is closed.
    - a malformed request (or headers over h11's 16 KiB limit) gets the JSON error shape instead of plain text.
    """

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_connections = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" | "body" while a deadline runs
        app = self.app

        async def capped(scope: dict, receive: Any, send: Any) -> None:
            if len(self.connections) > self.max_connections:
                headers, body = _json_error(503, "too many open connections; retry shortly", "too_many_connections")
                await send(
                    {"type": "http.response.start", "status": 503, "headers": [*headers, (b"retry-after", b"1")]}
                )
                await send({"type": "http.response.body", "body": body})
                return
            await app(scope, receive, send)

        self.app = capped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers", self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow(receiving=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request already received
        self._follow(receiving=False)

    def _follow(self, receiving: bool) -> None:
        """Arm the deadline of what the client is sending now: headers, a body, or nothing."""
        state = self.conn.their_state
        if state is h11.IDLE:  # (part of) the next request's headers: they must all arrive in time
            if receiving and self._phase is None:
                self._arm("headers", self.header_timeout_s)
            elif not receiving:
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

    def _expire(self) -> None:
        self._deadline = self._phase = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout_s: float, body_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """A GuardedH11Protocol class with these limits, for uvicorn.Config(http=...)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s, "max_connections": max_connections},
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
