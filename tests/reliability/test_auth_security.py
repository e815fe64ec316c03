"""API key coverage and handling: every route except the probes needs it, the comparison is hmac.compare_digest,
and neither keys nor prompt text reach logs, metrics or error bodies.

(The 401 shape per route and keys_match's truth table are in tests/app/test_auth.py; a timing measurement of the
comparison is deliberately absent: on a shared 2-core machine it would be noise, so the test pins the primitive.)
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app import auth

KEY = "rel-key_0123456789abcdef"
WRONG = "rel-key_0123456789abcdeX"  # same length, differs in the last character only
OPEN = {
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/info"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
PROTECTED = {
    ("POST", "/generate"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/diagnostics"),
    ("POST", "/diagnostics"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/tokenizer_info"),
    ("POST", "/steering/vectors"),
    ("GET", "/steering/vectors"),
    ("GET", "/steering/vectors/{name}"),
    ("DELETE", "/steering/vectors/{name}"),
    ("POST", "/hidden_states"),
    ("POST", "/patching"),
}
VALID = {
    "/generate": {"prompt": "hi", "max_new_tokens": 2},
    "/tokenize": {"text": "hi"},
    "/detokenize": {"tokens": [104]},
    "/diagnostics": {"prompt": "hi"},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/steering/vectors": {"name": "made", "layer": 0, "positive": ["HI"], "negative": ["hi"]},
    "/hidden_states": {"prompt": "hi"},
    "/patching": {"clean": "hi", "corrupt": "ho"},
}


def app_routes(client: TestClient) -> set[tuple[str, str]]:
    """(method, path) of every operation in the app's OpenAPI schema, plus the schema and docs pages themselves."""
    spec = client.app.openapi()
    docs = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc")}
    return {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops} | docs


def call(client: TestClient, method: str, path: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body = VALID.get(path) if method == "POST" else None
    params = {"prompt": "hi"} if (method, path) == ("GET", "/diagnostics") else None
    path = path.replace("{model_id}", "tiny").replace("{name}", "deleted" if method == "DELETE" else "kept")
    return client.request(method, path, json=body, params=params, headers=headers)


@pytest.fixture
def keyed(make_client: Callable[..., TestClient]) -> TestClient:
    client = make_client(api_key=KEY)
    for name in ("kept", "deleted"):  # steering vectors for GET and DELETE /steering/vectors/{name} (see `call`)
        made = VALID["/steering/vectors"] | {"name": name}
        assert (
            client.post("/steering/vectors", json=made, headers={"Authorization": f"Bearer {KEY}"}).status_code == 201
        )
    return client


def test_every_route_but_the_probes_needs_the_key(keyed: TestClient) -> None:
    """Derived from the app's own route table: a new route must be protected or added to OPEN on purpose."""
    routes = app_routes(keyed)
    assert routes - OPEN == PROTECTED
    for method, path in sorted(routes - OPEN):
        for token, code in [(None, "missing_api_key"), (WRONG, "invalid_api_key"), ("", "missing_api_key")]:
            resp = call(keyed, method, path, token)
            assert resp.status_code == 401, (method, path, token, resp.text)
            assert resp.json()["error"]["code"] == code
            assert WRONG not in resp.text and KEY not in resp.text
        assert call(keyed, method, path, KEY).status_code in (200, 201, 204), (method, path)
    for method, path in sorted(OPEN & routes):
        assert keyed.request(method, path).status_code == 200, (method, path)


def test_comparison_is_hmac_compare_digest(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    for method, path in sorted(PROTECTED):
        calls.clear()
        assert call(keyed, method, path, WRONG).status_code == 401
        assert calls == [(WRONG.encode(), KEY.encode())], (method, path)
        calls.clear()
        assert call(keyed, method, path, KEY).status_code in (200, 201, 204)
        assert calls == [(KEY.encode(), KEY.encode())], (method, path)


def test_keys_match_returns_compare_digests_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """keys_match has no shortcut of its own (no == or length check before the constant-time call)."""
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: True)
    assert auth.keys_match("short", "a much longer expected key")
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: False)
    assert not auth.keys_match(KEY, KEY)


def test_keys_and_prompts_stay_out_of_logs_and_metrics(keyed: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    marker = "PROMPT-MARKER-7f3a"
    caplog.set_level(logging.DEBUG)
    assert call(keyed, "POST", "/generate", WRONG).status_code == 401
    resp = keyed.post(
        "/generate", json={"prompt": f"{marker} text", "max_new_tokens": 2}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert resp.status_code == 200
    assert (
        keyed.post(
            "/generate", json={"prompt": marker, "temperature": "hot"}, headers={"Authorization": f"Bearer {KEY}"}
        ).status_code
        == 422
    )
    # GET puts the prompt in the query string: the access log records the path only
    assert (
        keyed.get("/diagnostics", params={"prompt": marker}, headers={"Authorization": f"Bearer {KEY}"}).status_code
        == 200
    )
    # an unknown path is logged (it is the path), but never becomes a metric label (no label per URL)
    assert keyed.get(f"/x-{marker}").status_code == 404
    metrics = keyed.get("/metrics").text
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not the test client
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in server_side if "/x-" not in r.getMessage())
    assert any(r.name == "shortcut.access" for r in caplog.records)  # the access log did run
    for secret in (KEY, WRONG, marker):
        assert secret not in logged and secret not in metrics, secret
    assert 'route="unmatched"' in metrics


def test_request_id_is_sanitised(make_client: Callable[..., TestClient]) -> None:
    """A client-chosen X-Request-ID is echoed only if it is a short plain token (it goes into logs)."""
    client = make_client()
    assert client.get("/health", headers={"x-request-id": "abc-123.x:y"}).headers["x-request-id"] == "abc-123.x:y"
    for hostile in ('a" b', "x" * 200, "<script>", "a;b=c"):
        echoed = client.get("/health", headers={"x-request-id": hostile}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", echoed), echoed
