"""ASGI middleware: request id, body-size limit, access log and the HTTP duration metric."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from app.errors import error_body
from app.metrics import Metrics

access_log = logging.getLogger("shortcut.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ServiceMiddleware:
    """Wraps every HTTP request; pure ASGI so streaming responses pass straight through."""

    def __init__(self, app: Any, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            body_receive = await self._bounded_body(headers, receive)
            if body_receive is None:
                await self._reject(send_wrapper, 413, f"request body exceeds {self.max_body} bytes")
            else:
                await self.app(scope, body_receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - t0
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.http_duration.labels(template, scope["method"], str(status["code"])).observe(elapsed)
            access_log.info(
                "%s %s %s %.1fms", scope["method"], scope["path"], status["code"], elapsed * 1000,
                extra={"request_id": request_id, "method": scope["method"], "path": scope["path"],
                       "status": status["code"], "duration_ms": round(elapsed * 1000, 2),
                       "client": (scope.get("client") or ("-",))[0]},
            )

    async def _bounded_body(self, headers: dict[str, str], receive: Any) -> Any | None:
        """Read the whole body (bounded); return a receive that replays it, or None if it is too large."""
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client left before sending the whole body
                return _replay_message(message)
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return None
            chunks.append(body)
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        return replay

    @staticmethod
    async def _reject(send: Any, status: int, message: str) -> None:
        body = json.dumps(error_body(status, message, code="body_too_large")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay_message(message: dict) -> Any:
    async def receive() -> dict:
        return message

    return receive


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, with the request id and fields passed in `extra`."""

    FIELDS = ("request_id", "method", "path", "status", "duration_ms", "client")

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        for f in self.FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "INFO", json_logs: bool = False) -> None:
    """Configure the root logger (plain or JSON lines)."""
    handler = logging.StreamHandler()
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
