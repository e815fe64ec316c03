"""Every JSON body the docs show (`curl -d '…'`) parses as pasted (issue #25: a prompt wrapped over two lines put a
raw newline inside a JSON string). Bodies abbreviated with `...` are left out."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a single-quoted shell word, with the '"'"' idiom for an apostrophe inside it
BODY = re.compile(r"""(?:-d|--data|--data-raw|--json)\s+'((?:[^']|'"'"')*)'""")
APOSTROPHE = "'\"'\"'"


def test_every_curl_body_in_the_docs_is_json() -> None:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bodies = [(f.name, m.group(1).replace(APOSTROPHE, "'")) for f in files for m in BODY.finditer(f.read_text())]
    assert len(bodies) > 10
    bad = []
    for name, body in bodies:
        if "..." in body or "…" in body:
            continue
        try:
            json.loads(body)
        except json.JSONDecodeError as e:
            bad.append(f"{name}: {e}: {body[:60]!r}")
    assert not bad, bad
