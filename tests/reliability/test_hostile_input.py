"""Hostile requests against a live server: each gets its documented status in the standard error shape (or a normal
answer where the input is odd but valid), and the server keeps serving: a normal request succeeds after each one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import httpx
import pytest

from tests.conftest import APP_CONFIG
from tests.helpers import ERROR_FIELDS
from tests.reliability.conftest import Server

JSON = {"content-type": "application/json"}
WINDOW = APP_CONFIG.block_size
DEPTH = 10_000


class Case(NamedTuple):
    id: str
    method: str
    path: str
    request: dict[str, Any]  # keyword arguments of httpx.Client.request
    status: int
    code: str | None = None  # expected error code (None: not checked)
    param: str | None = None  # expected error param (None: not checked)


def gen(**fields: Any) -> dict[str, Any]:
    """A /generate JSON body: a short valid request with `fields` replaced."""
    return {"json": {"prompt": "hello", "max_new_tokens": 3, **fields}}


def raw(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    """A request with this exact body and content type."""
    return {"content": body, "headers": {"content-type": content_type}}


def chunks(total: int, size: int = 65_536) -> Iterator[bytes]:
    """A JSON body of about `total` bytes, sent chunked (no Content-Length)."""
    yield b'{"prompt": "'
    for _ in range(total // size):
        yield b"a" * size
    yield b'"}'


CASES = [
    # prompts
    Case("empty-prompt", "POST", "/generate", gen(prompt=""), 422, "string_too_short", "prompt"),
    Case("empty-prompt-completions", "POST", "/v1/completions", {"json": {"prompt": ""}}, 400, "invalid_value"),
    Case("whitespace-prompt", "POST", "/generate", gen(prompt=" \n\t  "), 200),
    Case("nul-in-prompt", "POST", "/generate", gen(prompt="a\x00b"), 200),
    Case("lone-surrogate-escape", "POST", "/generate", raw(b'{"prompt": "\\ud800"}'), 422, "string_unicode", "prompt"),
    Case("1mb-prompt", "POST", "/generate", gen(prompt="a" * 1_000_000), 413, "body_too_large"),
    Case(
        "1mb-chunked-body", "POST", "/generate", {"content": chunks(1_100_000), "headers": JSON}, 413, "body_too_large"
    ),
    Case(
        "prompt-over-window", "POST", "/generate", gen(prompt="a" * 900_000), 400, "context_length_exceeded", "prompt"
    ),
    Case("prompt-not-a-string", "POST", "/generate", gen(prompt=123), 422, "string_type", "prompt"),
    Case("prompt-null", "POST", "/generate", gen(prompt=None), 422, "string_type", "prompt"),
    # max_new_tokens
    Case(
        "max-new-tokens-negative",
        "POST",
        "/generate",
        gen(max_new_tokens=-1),
        422,
        "greater_than_equal",
        "max_new_tokens",
    ),
    Case(
        "max-new-tokens-zero", "POST", "/generate", gen(max_new_tokens=0), 422, "greater_than_equal", "max_new_tokens"
    ),
    Case(
        "max-new-tokens-huge", "POST", "/generate", gen(max_new_tokens=10**30), 422, "less_than_equal", "max_new_tokens"
    ),
    Case(
        "max-new-tokens-over-window",
        "POST",
        "/generate",
        gen(max_new_tokens=65_536),
        400,
        "context_length_exceeded",
        "max_new_tokens",
    ),
    Case("max-new-tokens-string", "POST", "/generate", gen(max_new_tokens="10"), 422, "number_type", "max_new_tokens"),
    Case("max-new-tokens-bool", "POST", "/generate", gen(max_new_tokens=True), 422, "number_type", "max_new_tokens"),
    Case(
        "max-new-tokens-fraction", "POST", "/generate", gen(max_new_tokens=2.5), 422, "int_from_float", "max_new_tokens"
    ),
    # temperature (Python's json reads the NaN / Infinity literals, so the server must refuse them itself)
    Case(
        "temperature-nan",
        "POST",
        "/generate",
        raw(b'{"prompt": "hi", "temperature": NaN}'),
        422,
        "finite_number",
        "temperature",
    ),
    Case(
        "temperature-inf",
        "POST",
        "/generate",
        raw(b'{"prompt": "hi", "temperature": Infinity}'),
        422,
        "finite_number",
        "temperature",
    ),
    Case(
        "temperature-minus-inf",
        "POST",
        "/generate",
        raw(b'{"prompt": "hi", "temperature": -Infinity}'),
        422,
        None,
        "temperature",
    ),
    Case(
        "temperature-overflow",
        "POST",
        "/generate",
        raw(b'{"prompt": "hi", "temperature": 1e999}'),
        422,
        "finite_number",
        "temperature",
    ),
    Case("temperature-negative", "POST", "/generate", gen(temperature=-0.5), 422, "greater_than_equal", "temperature"),
    Case("temperature-huge", "POST", "/generate", gen(temperature=1e300), 422, "less_than_equal", "temperature"),
    Case("temperature-tiny", "POST", "/generate", gen(temperature=1e-40), 200),  # overflows float32 logits / T
    # top_p / top_k
    Case("top-p-zero", "POST", "/generate", gen(top_p=0), 422, "greater_than", "top_p"),
    Case("top-p-above-one", "POST", "/generate", gen(top_p=1.5), 422, "less_than_equal", "top_p"),
    Case("top-p-nan", "POST", "/generate", raw(b'{"prompt": "hi", "top_p": NaN}'), 422, None, "top_p"),
    Case("top-p-tiny", "POST", "/generate", gen(top_p=1e-300), 200),  # rounds to 0 in float32
    Case("top-k-zero", "POST", "/generate", gen(top_k=0), 200),
    Case("top-k-vocab", "POST", "/generate", gen(top_k=256), 200),
    Case("top-k-huge", "POST", "/generate", gen(top_k=10**12), 422, "less_than_equal", "top_k"),
    Case("top-k-negative", "POST", "/generate", gen(top_k=-1), 422, "greater_than_equal", "top_k"),
    # stop strings (max_stop_strings=16, max_stop_length=64 by default; the schema caps 256 strings of 1024 chars)
    Case(
        "100-stop-strings", "POST", "/generate", gen(stop=[f"s{i}" for i in range(100)]), 400, "invalid_value", "stop"
    ),
    Case("300-stop-strings", "POST", "/generate", gen(stop=[f"s{i}" for i in range(300)]), 422, "too_long", "stop"),
    Case("stop-string-100-chars", "POST", "/generate", gen(stop="x" * 100), 400, "invalid_value", "stop"),
    Case("stop-string-100k-chars", "POST", "/generate", gen(stop=["x" * 100_000]), 422, "string_length", "stop"),
    Case("stop-string-alone-100k-chars", "POST", "/generate", gen(stop="x" * 100_000), 422, "string_length", "stop"),
    Case("empty-stop-in-list", "POST", "/generate", gen(stop=[""]), 422, "string_length", "stop"),
    Case("stop-numbers", "POST", "/generate", gen(stop=[1, 2]), 422, "stop_type", "stop"),
    Case(
        "stop-object", "POST", "/v1/completions", {"json": {"prompt": "hi", "stop": {"a": 1}}}, 422, "stop_type", "stop"
    ),
    # other fields
    Case("logprobs-over-setting", "POST", "/generate", gen(logprobs=21), 400, "invalid_value"),
    Case("logprobs-over-schema", "POST", "/generate", gen(logprobs=257), 422, "less_than_equal", "logprobs"),
    Case("seed-negative", "POST", "/generate", gen(seed=-1), 422, "greater_than_equal", "seed"),
    Case("seed-2-64", "POST", "/generate", gen(seed=2**64), 422, "less_than_equal", "seed"),
    Case("seed-bool", "POST", "/generate", gen(seed=True), 422, "number_type", "seed"),
    Case("stream-number", "POST", "/generate", gen(stream=1), 422, "bool_type", "stream"),
    Case("unknown-field", "POST", "/generate", gen(evil=1), 422, "extra_forbidden", "evil"),
    Case("model-path-traversal", "POST", "/generate", gen(model="../../etc/passwd"), 404, "model_not_found", "model"),
    Case("model-name-too-long", "POST", "/generate", gen(model="m" * 65), 422, "string_too_long", "model"),
    # bodies that are not what they claim
    Case("invalid-utf8", "POST", "/generate", raw(b'{"prompt": "\xff\xfe\xfd"}'), 400, "invalid_body"),
    Case("not-json", "POST", "/generate", raw(b'{"prompt": '), 422, "json_invalid"),
    Case("body-is-a-list", "POST", "/generate", raw(b"[1, 2]"), 422, "model_attributes_type"),
    Case("empty-body", "POST", "/generate", raw(b""), 422),
    Case("text-plain", "POST", "/generate", raw(b'{"prompt": "hi"}', "text/plain"), 422),
    Case("form-encoded", "POST", "/generate", {"data": {"prompt": "hi"}}, 422),
    Case("nested-10k-body", "POST", "/generate", raw(b"[" * DEPTH + b"]" * DEPTH), 400, "invalid_body"),
    Case(
        "nested-10k-field",
        "POST",
        "/generate",
        raw(b'{"prompt": "hi", "stop": ' + b"[" * DEPTH + b"]" * DEPTH + b"}"),
        400,
        "invalid_body",
    ),
    Case(
        "nested-10k-object",
        "POST",
        "/v1/completions",
        raw(b'{"prompt": "hi", "stream_options": ' + b'{"a": ' * DEPTH + b"1" + b"}" * DEPTH + b"}"),
        400,
        "invalid_body",
    ),
    # OpenAI route
    Case("completions-n-9", "POST", "/v1/completions", {"json": {"prompt": "hi", "n": 9}}, 400, "invalid_value", "n"),
    Case(
        "completions-17-prompts",
        "POST",
        "/v1/completions",
        {"json": {"prompt": ["a"] * 17}},
        400,
        "invalid_value",
        "prompt",
    ),
    Case(
        "completions-unknown-field",
        "POST",
        "/v1/completions",
        {"json": {"prompt": "hi", "foo": 1}},
        400,
        "unsupported_parameter",
        "foo",
    ),
    # tokenizer routes
    Case("detokenize-256", "POST", "/detokenize", {"json": {"tokens": [256]}}, 422, "less_than_equal", "tokens.0"),
    Case(
        "detokenize-negative", "POST", "/detokenize", {"json": {"tokens": [-1]}}, 422, "greater_than_equal", "tokens.0"
    ),
    Case("detokenize-bool", "POST", "/detokenize", {"json": {"tokens": [True]}}, 422, "number_type", "tokens.0"),
    # /diagnostics options
    Case("diag-no-prompt", "GET", "/diagnostics", {}, 422, "missing", "prompt"),
    Case(
        "diag-logit-lens-negative",
        "GET",
        "/diagnostics",
        {"params": {"prompt": "hi", "logit_lens": -1}},
        422,
        "greater_than_equal",
        "logit_lens",
    ),
    Case(
        "diag-logit-lens-text",
        "GET",
        "/diagnostics",
        {"params": {"prompt": "hi", "logit_lens": "many"}},
        422,
        "int_parsing",
        "logit_lens",
    ),
    Case(
        "diag-logit-lens-huge",
        "GET",
        "/diagnostics",
        {"params": {"prompt": "hi", "logit_lens": 10**9}},
        422,
        "less_than_equal",
        "logit_lens",
    ),
    Case(
        "diag-flag-not-bool",
        "GET",
        "/diagnostics",
        {"params": {"prompt": "hi", "per_token": "maybe"}},
        422,
        "bool_parsing",
        "per_token",
    ),
    Case(
        "diag-format",
        "GET",
        "/diagnostics",
        {"params": {"prompt": "hi", "format": "xml"}},
        422,
        "literal_error",
        "format",
    ),
    Case(
        "diag-unknown-option",
        "GET",
        "/diagnostics",
        {"params": {"prompt": "hi", "rm": "-rf"}},
        422,
        "extra_forbidden",
        "rm",
    ),
    Case(
        "diag-over-window",
        "GET",
        "/diagnostics",
        {"params": {"prompt": "x" * (WINDOW + 1)}},
        400,
        "context_length_exceeded",
        "prompt",
    ),
    Case(
        "diag-post-flag-number",
        "POST",
        "/diagnostics",
        {"json": {"prompt": "hi", "ablation": 1}},
        422,
        "bool_type",
        "ablation",
    ),
    Case(
        "diag-post-lens-bool",
        "POST",
        "/diagnostics",
        {"json": {"prompt": "hi", "logit_lens": True}},
        422,
        "number_type",
        "logit_lens",
    ),
    # routing
    Case("wrong-method", "GET", "/generate", {}, 405, "method_not_allowed"),
    Case("unknown-route", "GET", "/admin", {}, 404, "route_not_found"),
]


def assert_error_shape(resp: httpx.Response, case: Case) -> None:
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ERROR_FIELDS, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    if case.code is not None:
        assert err["code"] == case.code, err
    if case.param is not None:
        assert err["param"] == case.param, err


@pytest.fixture(scope="module")
def http(tiny_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(http: httpx.Client, tiny_server: Server, case: Case) -> None:
    resp = http.request(case.method, case.path, **case.request)
    assert resp.status_code == case.status, resp.text[:500]
    if case.status >= 400:
        assert_error_shape(resp, case)
    elif case.path == "/generate":
        out = resp.json()
        assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 3, out
        body = case.request["json"]
        assert out["usage"]["prompt_tokens"] == len(body["prompt"].encode())
    # the server is still up and still serves a normal request
    assert tiny_server.process.poll() is None, tiny_server.log()
    ok = http.post("/generate", json={"prompt": "still alive?", "max_new_tokens": 4, "seed": 1})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 4


def test_error_bodies_are_valid_json_without_nan(http: httpx.Client) -> None:
    """Refusals of NaN input do not echo the NaN back as a non-standard JSON literal."""
    resp = http.post("/generate", content=b'{"prompt": "hi", "temperature": NaN}', headers=JSON)
    assert resp.status_code == 422
    json.loads(resp.text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in the error body"))
