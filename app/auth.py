"""API-key check: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from app.errors import APIError

# auto_error=False: the check below words the 401 in the API's error shape
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="`Authorization: Bearer <key>`, the key the server was given in SHORTCUT_API_KEY.",
)


def keys_match(given: str, expected: str) -> bool:
    """Constant-time comparison (time does not depend on how many leading characters match)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def check_authorization(header: str | None, key: SecretStr) -> APIError | None:
    """The 401 for an `Authorization` header value that does not carry `Bearer <key>`, else None.

    Used from the headers alone (the middleware calls it before any body is read) and by the route dependency."""
    scheme, _, credentials = (header or "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not keys_match(credentials, key.get_secret_value()):
        return APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return None


def require_api_key(key: SecretStr) -> Callable[..., Awaitable[None]]:
    """A dependency for protected routes that accepts `Authorization: Bearer <key>` only (it also puts the bearer
    scheme in the OpenAPI schema). The middleware checks the key from the headers before any body is read and marks
    the request; this repeats the check only where that did not happen."""

    async def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if getattr(request.state, "api_key_checked", False):
            return
        err = check_authorization(request.headers.get("authorization"), key)
        if err is not None:
            raise err

    return check
