"""One JSON error shape for every failure: {"error": {"message", "type", "param", "code"}} (OpenAI style)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import ErrorResponse
from model.engine import EngineDrainingError, EngineError, InvalidRequestError, PromptTooLongError, QueueFullError

log = logging.getLogger(__name__)

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


HTTP_CODES = {
    400: "invalid_body",
    404: "route_not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}  # framework errors
FASTAPI_BODY_ERROR = "There was an error parsing the body"  # FastAPI's 400; the cause says what went wrong

# The error responses an API router documents for its routes (OpenAPI): every one has the standard shape.
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 429, 503, 504)
}


def body_error_message(cause: BaseException | None) -> str:
    """The 400 message for a JSON body that could not be parsed, from the parser's exception."""
    if isinstance(cause, UnicodeDecodeError):
        return "request body is not valid UTF-8"
    if isinstance(cause, RecursionError):
        return "request body is nested too deeply to parse"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "request body has an integer literal over 4300 digits, the most the server reads"
    return "request body could not be parsed as UTF-8 JSON"


NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type"}
NOT_JSON_MESSAGE = (
    "the body was not read as JSON: send the header `Content-Type: application/json` "
    "(curl -d sends application/x-www-form-urlencoded; add -H 'Content-Type: application/json' or use --json)"
)


def _sent_json(request: Request) -> bool:
    """Whether the request said its body is JSON (application/json or a +json type)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def json_error_message(error: Mapping[str, Any], body: Any) -> str:
    """The 422 message for a body that is not JSON: the parser's reason and where (line, column, character)."""
    reason = str((error.get("ctx") or {}).get("error") or "not valid JSON")
    loc = tuple(error.get("loc", ()))
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    if pos is None:
        return f"request body is not valid JSON: {reason}"
    where = f"character {pos}"
    if isinstance(body, str):  # the decoded document: line and column as json.JSONDecodeError counts them
        line = body.count("\n", 0, pos) + 1
        column = pos - body.rfind("\n", 0, pos)
        where = f"line {line}, column {column} (character {pos})"
    hint = ""
    if "control character" in reason.lower():
        hint = "; a newline or tab inside a JSON string must be written \\n or \\t"
    return f"request body is not valid JSON: {reason} at {where}{hint}"


def _field_hint(request: Request, param: str) -> str | None:
    """What to send instead of an unknown field, from the route's body model's FIELD_HINTS (e.g. /generate's
    answer to OpenAI's max_tokens)."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    hints = getattr(model, "FIELD_HINTS", None)
    return hints.get(param) if isinstance(hints, Mapping) else None


class APIError(Exception):
    """An error with an HTTP status, rendered in the standard shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The standard error object."""
    return {
        "error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    }


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSONResponse carrying the standard error object."""
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def engine_error(e: EngineError, names: Mapping[str, str] | None = None) -> APIError:
    """Map an engine exception to its HTTP error; `names` renames engine fields to the route's (max_tokens)."""
    names = names or {}
    if isinstance(e, InvalidRequestError):
        param = names.get(e.param, e.param) if e.param else None
        if isinstance(e, PromptTooLongError):
            return APIError(
                400,
                e.describe(names.get("max_new_tokens", "max_new_tokens")),
                param=param,
                code="context_length_exceeded",
            )
        return APIError(400, str(e), param=param, code="invalid_value")
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineDrainingError):
        return APIError(503, str(e), code="draining")
    return APIError(500, "internal error", code="engine_error")


def _loc_param(loc: tuple) -> str | None:
    # a union's branch tag (`list[ChatMessage]`, `function-wrap[first_problem()]`) is no field: left out
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header") and "[" not in str(p)]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, expected or not, in the standard shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        e = engine_error(exc)
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = tuple(first.get("loc", ()))
        param = _loc_param(loc)
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            msg, param = json_error_message(first, exc.body), None
        elif loc == ("body",) and first.get("type") in NOT_AN_OBJECT and not _sent_json(request):
            msg = NOT_JSON_MESSAGE
        elif param:
            hint = _field_hint(request, param) if first.get("type") == "extra_forbidden" else None
            msg = f"{param}: {hint or msg}"
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(422, msg, param, first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, message = exc.status_code, str(exc.detail)
        if status == 400 and message == FASTAPI_BODY_ERROR:  # the body could not be decoded
            message = body_error_message(exc.__cause__)
        elif status == 404:
            message = f"no route {request.url.path!r}; GET /docs lists the routes"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path!r}"
        return error_response(status, message, code=HTTP_CODES.get(status), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %r", request.url.path)
        return error_response(500, "internal server error", code="internal_error")
