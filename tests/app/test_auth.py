"""API key: protected routes answer 401 without or with a wrong key, 200 with the right one; probes stay open."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.auth import keys_match
from tests.helpers import assert_error

KEY = "s3cret-key_0123456789"

PROTECTED = [
    ("POST", "/generate", {"prompt": "hi", "max_new_tokens": 2}),
    ("POST", "/tokenize", {"text": "hi"}),
    ("POST", "/detokenize", {"tokens": [104, 105]}),
    ("GET", "/diagnostics?prompt=hi", None),
    ("POST", "/diagnostics", {"prompt": "hi"}),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
    ("GET", "/v1/models", None),
]
OPEN = ["/health", "/ready", "/metrics"]


@pytest.fixture
def keyed(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_key=KEY)


def call(client: TestClient, method: str, path: str, body: dict | None, auth: str | None):
    headers = {"Authorization": auth} if auth is not None else {}
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_protected_routes(keyed: TestClient, method: str, path: str, body: dict | None) -> None:
    for auth, code in [
        (None, "missing_api_key"),
        ("Bearer", "missing_api_key"),
        (f"Basic {KEY}", "missing_api_key"),
        ("Bearer wrong", "invalid_api_key"),
        (f"Bearer {KEY}x", "invalid_api_key"),
        (f"Bearer {KEY[:-1]}", "invalid_api_key"),
    ]:
        resp = call(keyed, method, path, body, auth)
        err = assert_error(resp, 401, code=code)
        assert err["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"
    ok = call(keyed, method, path, body, f"Bearer {KEY}")
    assert ok.status_code == 200, ok.text
    assert "www-authenticate" not in ok.headers


def test_invalid_body_without_key_is_401_not_422(keyed: TestClient) -> None:
    """Schema details are not shown to unauthenticated callers."""
    resp = keyed.post("/generate", json={"prompt": "hi", "temperature": "hot"})
    assert_error(resp, 401, code="missing_api_key")


@pytest.mark.parametrize("path", OPEN)
def test_probes_and_metrics_stay_open(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_no_key_configured_means_open(client: TestClient) -> None:
    assert client.post("/tokenize", json={"text": "hi"}).status_code == 200
    resp = client.post("/tokenize", json={"text": "hi"}, headers={"Authorization": "Bearer anything"})
    assert resp.status_code == 200


def test_keys_match() -> None:
    assert keys_match("abc", "abc")
    assert keys_match("", "")
    assert keys_match(KEY, KEY)
    assert keys_match("äö✓", "äö✓")
    assert keys_match("\ud800x", "\ud800x")  # lone surrogates do not raise
    assert not keys_match("abc", "abd")
    assert not keys_match("ab", "abc")
    assert not keys_match("abc", "ab")
    assert not keys_match("", "abc")
    assert not keys_match("ABC", "abc")
    assert not keys_match("\ud800", "\ud801")
    assert not keys_match("é", "e\u0301")  # no Unicode normalisation: the bytes must be equal


def test_openapi_declares_the_key_only_where_it_is_required(keyed: TestClient, client: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>`, the key the server was given in SHORTCUT_API_KEY.",
    }
    for method, path, _ in PROTECTED:
        assert spec["paths"][path.split("?")[0]][method.lower()]["security"] == [{"apiKey": []}], (method, path)
    for path in ["/health", "/ready"]:
        assert "security" not in spec["paths"][path]["get"]
    # a server without a key does not claim to need one (on every request for the schema)
    for _ in range(2):
        spec = client.get("/openapi.json").json()
        assert "securitySchemes" not in spec["components"]
        assert not any("security" in op for ops in spec["paths"].values() for op in ops.values())
