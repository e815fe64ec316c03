"""The page at `/`, `/static`, and the schema pages served offline: checked over HTTP, no browser needed.

(What the page does is checked in a real browser by tests/app/test_page.py.)
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from app.routes.page import STATIC_DIR

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


class Refs(HTMLParser):
    """Every src/href in an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


def refs(html: str) -> list[str]:
    parser = Refs()
    parser.feed(html)
    return parser.refs


def test_page_is_served_with_a_csp_that_forbids_other_origins(client: TestClient) -> None:
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    csp = {d.split()[0]: d.split()[1:] for d in resp.headers["content-security-policy"].split("; ")}
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]  # no inline script, no eval, no other host
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert client.head("/").status_code == 200
    for hook in (
        "prompt",
        "model",
        "generate",
        "stop",
        "output",
        "trace-heatmap",
        "layer-controls",
        "inspect",
        "compare",
        "error",
    ):
        assert f'id="{hook}"' in resp.text, hook


def test_everything_the_page_loads_is_local_and_served(client: TestClient) -> None:
    html = client.get("/").text
    assert "<script>" not in html and "style=" not in html  # the CSP would block inline script and style
    local = refs(html)
    assert local and all(r.startswith(("/", "#")) for r in local), local
    for ref in (r for r in local if r.startswith("/static/")):
        resp = client.get(ref)
        assert resp.status_code == 200, ref
        assert len(resp.content) > 0, ref
    js = client.get("/static/page.js")
    assert js.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    # the script talks to this server only: relative URLs, no absolute ones
    assert not re.search(r"""fetch\(\s*["'`]https?:""", js.text)
    assert not re.search(r"""["'`]https?://""", js.text)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_schema_pages_load_their_assets_locally(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    assert not EXTERNAL.search(resp.text), resp.text  # FastAPI's defaults point at cdn.jsdelivr.net
    assert "fonts.googleapis.com" not in resp.text
    assets = [r for r in refs(resp.text) if r.startswith("/static/")]
    assert assets
    for ref in assets:
        assert client.get(ref).status_code == 200, ref
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_page_routes_stay_out_of_the_schema_and_open_with_a_key(make_client) -> None:
    keyed = make_client(api_key="page-test-key")
    paths = keyed.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    for path in ("/", "/static/page.js", "/docs", "/redoc"):
        assert keyed.get(path).status_code == 200, path  # the page asks for the key itself, on the API's 401
    assert keyed.get("/v1/models").status_code == 401


def test_missing_static_file_is_a_404_in_the_error_shape(client: TestClient) -> None:
    resp = client.get("/static/nope.js")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"


def test_vendored_libraries_keep_their_licences() -> None:
    vendor = STATIC_DIR / "vendor"
    readme = (vendor / "README.md").read_text()
    for folder, licence in (("echarts", "LICENSE"), ("swagger-ui", "LICENSE"), ("redoc", "LICENSE")):
        assert (vendor / folder / licence).is_file(), folder
        assert f"`{folder}/`" in readme, folder
    assert "6.0.0" in readme and "5.35.0" in readme and "2.5.4" in readme


def test_static_requests_have_their_own_metric_label(client: TestClient) -> None:
    client.get("/static/page.js")
    client.get("/static/nope.js")
    text = client.get("/metrics").text
    assert 'route="/static/{path}",status="200"' in text
    assert 'route="/static/{path}",status="404"' in text
