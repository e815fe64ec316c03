"""ASGI middleware: request id, Host check, API key from the headers, body limits, access log and HTTP metrics."""

from __future__ import annotations

import codecs
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from app.auth import check_authorization
from app.errors import error_body
from app.metrics import Metrics, method_label

access_log = logging.getLogger("shortcut.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# C0/C1 control characters and the Unicode line/paragraph separators: what could start a forged log line
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


# looked up (imported) now: looked up at the first escape, with no file descriptor left, it could not be imported
_UNICODE_ESCAPE = codecs.lookup("unicode_escape")


def escape_controls(text: str) -> str:
    """`text` with every control character written as a visible escape (\\n, \\x1b, \\u2028)."""
    return _CONTROL.sub(lambda m: _UNICODE_ESCAPE.encode(m.group())[0].decode("ascii"), text)


def default_allowed_hosts(bind_host: str) -> tuple[str, ...] | None:
    """Host names served when SHORTCUT_ALLOWED_HOSTS is unset: the localhost names and the bind address; None
    (any) when bound to a wildcard address, where every name the machine has is an address it serves."""
    if bind_host.strip("[]") in WILDCARD_BINDS:
        return None
    return (*LOCAL_HOSTS, bind_host.strip("[]").lower())


def host_name(header: str) -> str:
    """The name part of a Host header value, lower-cased: 'Example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


@dataclass
class _BodyState:
    """What the middleware knows of a request's body while it is read."""

    pending: bool  # more of the body is to come
    size: int = 0  # bytes read so far
    head: bytes = b""  # its first 4 bytes (to refuse UTF-16/32 JSON)


class ServiceMiddleware:
    """Wraps every HTTP request; pure ASGI so streaming responses pass straight through.

    Before the app runs, from the headers alone: the Host check (400), a declared body over the limit (413) and, on
    protected paths, the API key (401). None of these reads the body. The body is read only when the route asks for
    it, counted as it arrives (413 past the limit) and refused if it is UTF-16/32 JSON (400). A response sent before
    the body was read closes the connection, so a client cannot keep feeding an unread body."""

    def __init__(
        self,
        app: Any,
        metrics: Metrics,
        max_body_bytes: int,
        routes: Iterable[BaseRoute] = (),
        api_key: SecretStr | None = None,
        protected: Iterable[str] = (),
        allowed_hosts: Iterable[str] | None = None,
    ) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes
        self.routes, self.api_key, self.protected = list(routes), api_key, frozenset(protected)
        hosts = None if allowed_hosts is None or "*" in allowed_hosts else frozenset(h.lower() for h in allowed_hosts)
        self.hosts = hosts
        self.host_suffixes = tuple(h[1:] for h in hosts or () if h.startswith("*."))  # "*.example.com"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500, "complete": False}
        length = headers.get("content-length")
        body = _BodyState(pending="transfer-encoding" in headers or (length is not None and length != "0"))

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-request-id", request_id.encode())]
                if body.pending:  # answered before the body was read: do not wait for the rest of it
                    extra.append((b"connection", b"close"))
                message["headers"] = list(message.get("headers", [])) + extra
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                status["complete"] = True
            await send(message)

        async def counted_receive() -> dict:
            message = await receive()
            if message["type"] != "http.request":
                body.pending = False
                return message
            chunk = message.get("body", b"")
            body.size += len(chunk)
            body.pending = message.get("more_body", False)
            if body.size > self.max_body:
                raise StarletteHTTPException(413, f"request body exceeds {self.max_body} bytes")
            if len(body.head) < 4 and _is_json(headers):
                body.head += chunk[: 4 - len(body.head)]
                if body.head[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in body.head:
                    raise StarletteHTTPException(400, "request body is not UTF-8 (UTF-16 and UTF-32 are refused)")
            return message

        try:
            refusal = self._refuse(scope["path"], headers, scope["state"])
            if refusal is not None:
                await _send_error(send_wrapper, *refusal)
            else:
                await self.app(scope, counted_receive, send_wrapper)
            if not status["complete"] and status["code"] < 400:  # the client left before the answer ended (a stream)
                status["code"] = 499
        finally:
            elapsed = time.perf_counter() - t0
            method = method_label(scope["method"])
            self.metrics.http_duration.labels(self._template(scope), method, str(status["code"])).observe(elapsed)
            access_log.info(
                "%s %s %s %.1fms",
                scope["method"],
                scope["path"],
                status["code"],
                elapsed * 1000,
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status["code"],
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": (scope.get("client") or ("-",))[0],
                },
            )

    def _refuse(
        self, path: str, headers: dict[str, str], state: dict
    ) -> tuple[int, str, str, dict[str, str] | None] | None:
        """(status, message, code, headers) for a request refused on its headers alone, else None."""
        if self.hosts is not None:
            name = host_name(headers.get("host", ""))
            if name not in self.hosts and not (self.host_suffixes and name.endswith(self.host_suffixes)):
                return 400, "Host header not allowed (the server's SHORTCUT_ALLOWED_HOSTS)", "host_not_allowed", None
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return 413, f"request body exceeds {self.max_body} bytes", "body_too_large", None
        if self.api_key is not None and path in self.protected:
            err = check_authorization(headers.get("authorization"), self.api_key)
            if err is not None:
                return err.status, err.message, err.code or "", err.headers
            state["api_key_checked"] = True  # the route dependency need not compare again
        return None

    def _template(self, scope: dict) -> str:
        """The route template for the metric label (never the client's path): the route the app matched, else
        the first route whose pattern matches (plain Starlette routes such as /docs set none), else 'unmatched'."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "unmatched"


def _is_json(headers: dict[str, str]) -> bool:
    content_type = headers.get("content-type", "").lower()
    return not content_type or "json" in content_type


async def _send_error(send: Any, status: int, message: str, code: str, headers: dict[str, str] | None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, with the request id and fields passed in `extra`."""

    FIELDS = ("request_id", "method", "path", "status", "duration_ms", "client")

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for f in self.FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class PlainFormatter(logging.Formatter):
    """Plain-text lines; control characters in the message (client paths, methods, ...) are escaped, so a client
    can never start a line of its own. Tracebacks keep their newlines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape_controls(record.message)
        return super().formatMessage(safe)


def setup_logging(level: str = "INFO", json_logs: bool = False) -> None:
    """Configure the root logger (plain or JSON lines)."""
    handler = logging.StreamHandler()
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
