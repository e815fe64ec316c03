"""Where a request's intervention meets the served model: named steering vectors looked up, everything checked.

`resolve` is the one function the routes that take an `intervention` (/generate, /v1/completions,
/v1/chat/completions, POST /diagnostics) call: it turns the API's `InterventionSpec` into the engine's
`Intervention`, looking named vectors up in the app's store (`app.state.steering`: None, or an object with
`lookup(model, checkpoint_sha256, name, field) -> float32 tensor (d_model,)` that raises `APIError` 400 naming
`field` for an unknown name or a vector made for another checkpoint), and checks the result against the model (a
400 naming the entry's field: layer, vector length, finite numbers, coeff, positions).
"""

from __future__ import annotations

from typing import Protocol

import torch
from fastapi import Request

from app.errors import APIError
from app.schemas import InterventionSpec, VectorLookup
from app.service import ServedModel
from model.edits import Intervention


class SteeringStore(Protocol):
    """What `app.state.steering` offers this module (named vectors; app.steering builds it)."""

    def lookup(self, model: str, checkpoint_sha256: str, name: str, field: str) -> torch.Tensor: ...


def lookup_for(request: Request, served: ServedModel) -> VectorLookup:
    """name, field -> the vector, for `served`'s model: from the app's store, or a 400 when it has none."""
    store: SteeringStore | None = getattr(request.app.state, "steering", None)

    def lookup(name: str, field: str) -> torch.Tensor:
        if store is None:
            raise APIError(
                400, f"{field}: named steering vectors are not available here", param=field, code="invalid_value"
            )
        return store.lookup(served.name, served.sha256, name, field)

    return lookup


def resolve(spec: InterventionSpec | None, request: Request, served: ServedModel) -> Intervention | None:
    """The engine's form of a request's `intervention` for `served` (None when there is none or it is empty);
    APIError 400 naming the field for anything the model cannot apply."""
    if spec is None:
        return None
    iv = spec.to_engine(lookup_for(request, served))
    if iv is None:
        return None
    config = served.checkpoint.config
    problem = iv.problem(config.n_layer, config.d_model)
    if problem is not None:
        raise APIError(400, problem[1], param=problem[0], code="invalid_value")
    return iv
