"""Server-Sent Events framing and the streamed response, shared by /generate and /v1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

# SSE lines end at CR or LF only, but many clients split lines like str.splitlines() (httpx's iter_lines among
# them), which also breaks at these: escape them, as JSON allows, so a payload is always one line to everyone.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
# no caching, and no buffering by a proxy in front (nginx reads X-Accel-Buffering): each event goes out at once
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_json(data: Any) -> str:
    """`data` as one line of JSON (UTF-8 kept, every character that some client reads as a line break escaped)."""
    return json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)


def sse_event(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event: an optional `event:` line and one `data:` line."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {sse_json(data)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A streamed answer of Server-Sent Events."""
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
