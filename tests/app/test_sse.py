"""SSE framing: a payload is one line for every client, whatever the generated text holds."""

from __future__ import annotations

import json

from app.sse import sse_event


def test_payload_stays_one_line_for_splitlines_clients() -> None:
    text = "a\u2028b\u2029c\x85d\ne\rf\x1cg ✓ é"
    out = sse_event({"text": text}, "token")
    lines = out.splitlines()  # what httpx's iter_lines and many hand-written clients do
    assert lines == out.split("\n")[:-1] and lines[0] == "event: token" and lines[2] == ""
    assert json.loads(lines[1].removeprefix("data: "))["text"] == text
    assert "✓ é" in lines[1]  # non-ASCII text is kept as UTF-8, only line breaks are escaped
    assert sse_event({"x": 1}) == 'data: {"x": 1}\n\n'
