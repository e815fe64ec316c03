"""`python docs/check_links.py`: every relative link of README.md, docs/*.md, bench/README.md and deploy/README.md
points to a file of the repository, and every `#anchor` to a heading of its target (GitHub's heading ids).

Prints one line per broken link and exits 1 if there is one; links to http(s) pages are not followed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = [
    "README.md",
    "bench/README.md",
    "deploy/README.md",
    "SECURITY.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"!?\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def slug(heading: str) -> str:
    """GitHub's id of a heading: lower case, punctuation dropped (but - and _), spaces to -."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(path: Path) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    ids = set()
    for line in prose(path):
        m = re.match(r"^#{1,6} (.*)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            ids.add(s if n == 0 else f"{s}-{n}")
    return ids


def broken(rel: str) -> list[str]:
    src = ROOT / rel
    out = []
    for line in prose(src):
        for target in LINK.findall(re.sub(r"`[^`]*`", "``", line)):  # no links inside code spans
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (src.parent / path).resolve() if path else src
            if not dest.exists():
                out.append(f"{rel}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                out.append(f"{rel}: {target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return out


def main() -> int:
    problems = [p for rel in FILES if (ROOT / rel).exists() for p in broken(rel)]
    print("\n".join(problems) or f"all links resolve ({len(FILES)} files)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
