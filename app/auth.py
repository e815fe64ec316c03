"""API-key check: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import APIError

# auto_error=False: the check below decides (a server without a key accepts every request) and words the 401
bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="`Authorization: Bearer <key>`; required only when the server sets SHORTCUT_API_KEY.")


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
