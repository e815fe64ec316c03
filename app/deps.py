"""Shared route dependencies: model lookup and readiness."""

from __future__ import annotations

from fastapi import Request

from app.errors import APIError
from app.service import ServedModel, resolve


def get_served(request: Request, name: str | None) -> ServedModel:
    """The served model called `name` (default: the main model); 503 until ready, 404 if unknown."""
    state = request.app.state
    if not state.ready:
        raise APIError(503, "model is not loaded yet", code="not_ready")
    if state.draining:
        raise APIError(503, "server is shutting down and accepts no new requests", code="draining")
    if name is None:
        name = state.settings.model_name
    served = resolve(state.models, state.settings.model_aliases, name)
    if served is None:
        raise APIError(
            404,
            f"model '{name}' not found; GET /v1/models lists the served models",
            param="model",
            code="model_not_found",
        )
    return served
