"""API-key check: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from app.errors import APIError

# auto_error=False: the check below words the 401 in the API's error shape
bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="`Authorization: Bearer <key>`, the key the server was given in SHORTCUT_API_KEY.")


def keys_match(given: str, expected: str) -> bool:
    """Constant-time comparison (time does not depend on how many leading characters match)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def require_api_key(key: SecretStr) -> Callable[..., Awaitable[None]]:
    """A dependency for protected routes that accepts `Authorization: Bearer <key>` only (it also puts the bearer
    scheme in the OpenAPI schema)."""

    async def check(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if credentials is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not keys_match(credentials.credentials.strip(), key.get_secret_value()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check
