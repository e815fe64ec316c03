"""What a bad body costs the event loop (#24 item 3): each list is refused at its length or at its first bad item,
with a short error list, so that no body up to the body limit holds the loop for long. Pydantic alone validates every
item and builds one error per bad one: the issue's bodies took 1.3-2.4 s each, and two such clients took /health's
p50 from 3 ms to 2.4 s.

The bound (0.5 s per answer, the best of three tries) is generous for this slow shared machine (2 cores, several
test runs at once), where these answers took 8-120 ms, and the bodies of ~250,000-330,000 arrays 190-300 ms. A live
`python -m app` server answers, so the JSON parse and the collector's work on a 1 MB body are counted too.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import assert_error
from tests.reliability.conftest import Server

BODY_LIMIT = 1_000_000  # SHORTCUT_MAX_BODY_BYTES's default, which the tiny server runs with
BOUND_S = 0.5
MAX_ITEM_ERRORS = 4  # at most this many problems listed (app.schemas.MAX_ITEM_ERRORS: a bad object's errors)
# the JSON parse of ~330,000 arrays at the body limit is json.loads's own cost (~0.1 s unloaded, ~0.3 s here): the
# collector no longer walks the loaded model on top of it (app.__main__ freezes what is loaded; before, ~1.2 s)
PARSE_BOUND_S = 1.0


def fill(prefix: str, item: str, suffix: str) -> bytes:
    """`prefix` + as many comma-separated `item`s as fit under the body limit + `suffix`."""
    n = (BODY_LIMIT - len(prefix) - len(suffix) - 64) // (len(item) + 1)
    return (prefix + ",".join([item] * n) + suffix).encode()


def body(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


VEC = '{"layer":0,"vector":[1.0]}'
CASES = {
    # the three
    "completions-150k-strings": ("/v1/completions", body({"prompt": ["a"] * 150_000})),
    "completions-240k-negative-ids": ("/v1/completions", body({"prompt": [-1] * 240_000})),
    "detokenize-190k-ids-over-255": ("/detokenize", body({"tokens": [300] * 190_000})),
    # a bad item last, under each list's cap: one error, not the whole list validated item by item in vain
    "detokenize-last-id-bad": ("/detokenize", body({"tokens": [1] * 65_535 + [300]})),
    "completions-ids-all-bad": ("/v1/completions", body({"prompt": ["x"] + [1] * 200_000})),
    "completions-id-lists": ("/v1/completions", fill('{"prompt":[', "[-1]", "]}")),
    "diagnostics-ids": ("/diagnostics", body({"tokens": [256] * 65_536})),
    "generate-vector-strings": (
        "/generate",
        body({"prompt": "a", "intervention": {"add": [{"layer": 0, "vector": ["x"] * 16_384}]}}),
    ),
    "generate-vector-too-long": (
        "/generate",
        fill('{"prompt":"a","intervention":{"add":[{"layer":0,"vector":[', "1", "]}]}}"),
    ),
    "generate-skip-entries": ("/generate", body({"prompt": "a", "intervention": {"skip": [{}] * 1024}})),
    "generate-add-entries": ("/generate", fill('{"prompt":"a","intervention":{"add":[', VEC, "]}}")),
    "chat-messages": ("/v1/chat/completions", body({"messages": [{"role": 1, "content": 2}] * 1024})),
    "chat-content-parts": ("/v1/chat/completions", body({"messages": [{"role": "user", "content": [1] * 150_000}]})),
    "tokenize-messages": ("/tokenize", fill('{"messages":[', "{}", "]}")),
    "steering-prompts": (
        "/steering/vectors",
        body({"name": "v", "layer": 0, "positive": [1] * 1024, "negative": ["a"]}),
    ),
    "steering-vector": ("/steering/vectors", body({"name": "v", "layer": 0, "vector": [1.0] * 65_535 + ["x"]})),
    # the JSON parse itself, at the body limit: ~330,000 empty arrays (each one an object the collector tracks)
    "parse-empty-arrays": ("/v1/completions", fill('{"prompt":[', "[]", "]}")),
    "parse-nested-ok-ids": ("/v1/completions", fill('{"prompt":[[', "1", "]]}")),
}


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=30) as c:  # one client: no connection set-up in the times
        yield c


def post(client: httpx.Client, path: str, data: bytes) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    r = client.post(path, content=data, headers={"content-type": "application/json"})
    return time.perf_counter() - start, r


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_body_is_refused_quickly_with_a_short_error_list(client: httpx.Client, name: str) -> None:
    path, data = CASES[name]
    assert len(data) <= BODY_LIMIT
    bound = PARSE_BOUND_S if name in ("completions-id-lists", "parse-empty-arrays") else BOUND_S
    times = []
    for _ in range(3):
        elapsed, r = post(client, path, data)
        times.append(elapsed)
        assert 400 <= r.status_code < 500 and r.status_code != 413, (r.status_code, r.text[:300])
        err = assert_error(r, r.status_code)
        more = re.search(r"\(and (\d+) more problems?\)", err["message"])
        assert more is None or int(more.group(1)) < MAX_ITEM_ERRORS, err["message"][:300]
        if min(times) < bound:
            break
    assert min(times) < bound, (name, times)


def test_the_first_bad_item_is_named_at_its_index(client: httpx.Client) -> None:
    """Only the first bad item is reported, at its place (the param), as pydantic's own error for it."""
    _, r = post(client, "/detokenize", body({"tokens": [1, 2, 300, -1, 400]}))
    err = assert_error(r, 422, code="less_than_equal", param="tokens.2")
    assert "more problem" not in err["message"]
    _, r = post(client, "/tokenize", body({"messages": [{"role": "user", "content": "a"}, {"role": "x"}, {}]}))
    assert_error(r, 422, code="literal_error", param="messages.1.role")
    _, r = post(client, "/v1/completions", body({"prompt": [1, 2, -5, 7]}))
    err = assert_error(r, 422, code="prompt_type", param="prompt")
    assert "item 2 " in err["message"], err
