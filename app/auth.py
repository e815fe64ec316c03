"""API-key check: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import APIError

# auto_error=False: the check below decides (a server without a key accepts every request) and words the 401
bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="`Authorization: Bearer <key>`, the key the server was given in SHORTCUT_API_KEY.")


def keys_match(given: str, expected: str) -> bool:
    """Constant-time comparison (time does not depend on how many leading characters match)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


async def require_api_key(request: Request,
                          credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    """Dependency for protected routes; a no-op when no key is configured."""
    key = request.app.state.settings.api_key
    if key is None:
        return
    if credentials is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not keys_match(credentials.credentials.strip(), key.get_secret_value()):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def document_auth(app: FastAPI, key_required: bool) -> None:
    """Keep the OpenAPI schema honest: without a configured key, drop the bearer requirement the routes declare."""
    if key_required:
        return
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        spec = build()  # FastAPI caches the dict; the first call strips it, later ones find nothing to strip
        if spec.get("components", {}).pop("securitySchemes", None) is not None:
            for operations in spec["paths"].values():
                for op in operations.values():
                    op.pop("security", None)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
