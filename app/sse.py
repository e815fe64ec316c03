"""Server-Sent Events framing shared by /generate and /v1."""

from __future__ import annotations

import json
from typing import Any

# SSE lines end at CR or LF only, but many clients split lines like str.splitlines() (httpx's iter_lines among
# them), which also breaks at these: escape them, as JSON allows, so a payload is always one line to everyone.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(data: Any) -> str:
    """`data` as one line of JSON (UTF-8 kept, every character that some client reads as a line break escaped)."""
    return json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)


def sse_event(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event: an optional `event:` line and one `data:` line."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {sse_json(data)}\n\n"
