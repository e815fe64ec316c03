"""The web page at `/`, its static files at `/static/...`, and the schema pages (`/docs`, `/redoc`) served offline.

Everything the page and the schema pages load comes from this package (`app/static/`, third-party files in
`app/static/vendor/`, see its README): no CDN, so the server works with no internet.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
VENDOR = "/static/vendor"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"

# The page runs only its own scripts and talks only to this server (connect-src 'self'): no inline script, no
# eval, nothing from another origin. Inline style *attributes* are not allowed either; the charting library sets
# styles through the CSSOM, which CSP does not restrict.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# The schema pages: their scripts from /static and FastAPI's one inline script, allowed by its hash (worked out from
# the page, so a FastAPI upgrade that changes it keeps working); inline styles, as ReDoc writes its styles into
# <style> elements; ReDoc's search worker from a blob: URL; data: images (Swagger's icons). Nothing from another
# origin (ReDoc's logo from its CDN is refused here rather than requested), and no framing.
DOCS_CSP = (
    "default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S)


def with_docs_csp(page: HTMLResponse) -> HTMLResponse:
    """`page` with the schema pages' CSP and the page headers' others."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()}'"
        for m in _INLINE_SCRIPT.finditer(bytes(page.body))
    )
    page.headers.update({**PAGE_HEADERS, "Content-Security-Policy": DOCS_CSP.format(hashes=hashes).replace("  ", " ")})
    return page


router = APIRouter(include_in_schema=False)


class _StaticFiles(StaticFiles):
    """StaticFiles that names its route, so the access log and the HTTP metric say `/static/{path}` (a mount sets
    no route in the scope, and unknown paths are labelled "unmatched")."""

    path = "/static/{path}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        await super().__call__(scope, receive, send)


def static_files() -> StaticFiles:
    """The `/static` mount: the page's script, styles and vendored libraries."""
    return _StaticFiles(directory=STATIC_DIR)


@router.api_route("/", methods=["GET", "HEAD"])
async def page() -> FileResponse:
    """The page: write, watch the residual stream per layer, switch blocks off, inspect, compare."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI with its script and styles from /static (FastAPI's default loads them from a CDN)."""
    return with_docs_csp(
        get_swagger_ui_html(
            openapi_url=request.app.openapi_url,
            title=f"{request.app.title} - Swagger UI",
            oauth2_redirect_url=OAUTH2_REDIRECT,
            swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
        )
    )


@router.get(OAUTH2_REDIRECT)
async def swagger_ui_redirect() -> HTMLResponse:
    """Swagger UI's OAuth2 redirect helper (self-contained)."""
    return with_docs_csp(get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc with its script from /static and no web fonts (FastAPI's default loads both from CDNs)."""
    return with_docs_csp(
        get_redoc_html(
            openapi_url=request.app.openapi_url,
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=f"{VENDOR}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )
    )
