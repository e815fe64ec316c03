"""/steering/vectors: make (from contrasting prompts, as a job on the engine's worker) or upload, list, read and delete
named steering vectors; requests use them by name in `intervention.add`."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from app.deps import get_served
from app.errors import ERRORS, APIError
from app.generation import run_job
from app.schemas import JsonNumber, ModelName, Utf8Only, finite_number, first_problem, utf8_text
from app.service import ServedModel
from app.steering import SteeringStore
from model import tokenizer
from model.steering import NAME_PATTERN, ContrastResult, SteeringVector, contrast_job
from model.transformer import Transformer

router = APIRouter(tags=["steering"], responses={**ERRORS, 409: ERRORS[400]})

MAX_PROMPTS_SCHEMA, MAX_VECTOR_SCHEMA = 1024, 65536  # schema caps; the settings' limits are lower or equal
VectorName = Annotated[str, Field(pattern=NAME_PATTERN, description="letters, digits, _ . -; 1..64 characters")]
Prompt = Annotated[str, Field(min_length=1), Utf8Only]
Prompts = Annotated[
    list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS_SCHEMA), first_problem(MAX_PROMPTS_SCHEMA, utf8_text)
]
Float = Annotated[float, Field(allow_inf_nan=False), JsonNumber]


class SteeringVectorCreate(BaseModel):
    """Make a vector from `positive` and `negative` prompts (mean of resid_post[layer] over each prompt's positions,
    or its last position; positive set's mean minus negative set's), or upload `vector` made elsewhere."""

    # the schema says what the validator below checks: positive and negative, or vector (with no reduce)
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["positive", "negative"], "not": {"required": ["vector"]}},
                {
                    "required": ["vector"],
                    "not": {
                        "anyOf": [{"required": ["positive"]}, {"required": ["negative"]}, {"required": ["reduce"]}]
                    },
                },
            ]
        },
    )

    name: VectorName
    model: ModelName | None = Field(None, description="a served model; default the main one")
    layer: Annotated[int, Field(ge=0, le=4095), JsonNumber] = Field(..., description="the block it is added after")
    # optional but never null: omitted is None, an explicit null is refused (422), as the schema says
    positive: Prompts = Field(None, description="prompts showing the behaviour to add")  # type: ignore[arg-type]
    negative: Prompts = Field(None, description="prompts showing its opposite")  # type: ignore[arg-type]
    reduce: Literal["mean", "last"] = Field(None, description="each prompt's positions: mean (default) or last")  # type: ignore[arg-type]
    vector: Annotated[
        list[Float],
        Field(min_length=1, max_length=MAX_VECTOR_SCHEMA),
        first_problem(MAX_VECTOR_SCHEMA, finite_number, float),
    ] = Field(
        None,  # type: ignore[arg-type]
        description="d_model floats (instead of positive/negative)",
    )
    replace: StrictBool = Field(False, description="overwrite a vector of this name")

    @model_validator(mode="after")
    def _one_source(self) -> SteeringVectorCreate:
        contrast = self.positive is not None or self.negative is not None
        if contrast == (self.vector is not None):
            raise ValueError("give either positive and negative prompts, or a vector")
        if contrast and (self.positive is None or self.negative is None):
            raise ValueError("positive and negative go together")
        if self.vector is not None and self.reduce is not None:
            raise ValueError("reduce applies to positive/negative prompts, not to an uploaded vector")
        return self


class SteeringVectorInfo(BaseModel):
    """A stored vector's metadata."""

    name: str
    model: str
    checkpoint_sha256: str
    layer: int
    norm: float
    positive: int = Field(..., description="prompts in the positive set (0 when uploaded)")
    negative: int
    reduce: str | None
    created: int = Field(..., description="unix seconds")


class SteeringVectorList(BaseModel):
    data: list[SteeringVectorInfo]


class SteeringVectorFull(SteeringVectorInfo):
    vector: list[float]


def info(vec: SteeringVector) -> dict[str, Any]:
    """The metadata a route answers with."""
    return {
        "name": vec.name,
        "model": vec.model,
        "checkpoint_sha256": vec.checkpoint_sha256,
        "layer": vec.layer,
        "norm": vec.norm,
        "positive": vec.positive,
        "negative": vec.negative,
        "reduce": vec.reduce or None,
        "created": vec.created,
    }


def _store(request: Request) -> SteeringStore:
    return request.app.state.steering


def _not_found(name: str) -> APIError:
    return APIError(404, f"no steering vector named {name[:64]!r}", param="name", code="steering_vector_not_found")


def _check_prompts(body: SteeringVectorCreate, request: Request, served: ServedModel) -> list[list[list[int]]]:
    """Each set's token ids, within the settings' caps and the context window (400/413 naming what refused it)."""
    settings = request.app.state.settings
    window = served.checkpoint.config.block_size
    sets = []
    for field, prompts in (("positive", body.positive), ("negative", body.negative)):
        assert prompts is not None
        if len(prompts) > settings.steering_max_prompts:
            raise APIError(
                400,
                f"{field} has {len(prompts)} prompts; the most is {settings.steering_max_prompts} "
                "(SHORTCUT_STEERING_MAX_PROMPTS)",
                param=field,
                code="too_many_prompts",
            )
        ids = []
        for i, text in enumerate(prompts):
            n = len(text.encode("utf-8"))
            if n > settings.steering_max_prompt_bytes:
                raise APIError(
                    413,
                    f"{field}[{i}] is {n} bytes; the most is {settings.steering_max_prompt_bytes} "
                    "(SHORTCUT_STEERING_MAX_PROMPT_BYTES)",
                    param=f"{field}[{i}]",
                    code="prompt_too_large",
                )
            tokens = tokenizer.encode(text)
            if len(tokens) > window:
                raise APIError(
                    400,
                    f"{field}[{i}] is {len(tokens)} tokens; the context window is {window} tokens",
                    param=f"{field}[{i}]",
                    code="context_length_exceeded",
                )
            ids.append(tokens)
        sets.append(ids)
    return sets


@router.post("/steering/vectors", status_code=201, response_model=SteeringVectorInfo)
async def create_vector(body: SteeringVectorCreate, request: Request) -> dict[str, Any]:
    """Make a named steering vector (from prompts, on the model's worker) or upload one; 409 if the name exists."""
    served = get_served(request, body.model)
    settings = request.app.state.settings
    store = _store(request)
    c = served.checkpoint.config
    if body.layer >= c.n_layer:
        raise APIError(
            400,
            f"layer {body.layer} is out of range: the model has layers 0..{c.n_layer - 1}",
            param="layer",
            code="invalid_value",
        )
    await run_in_threadpool(store.check_room, body.name, body.replace)
    if body.vector is not None:
        if len(body.vector) > settings.steering_max_vector_floats:
            raise APIError(
                413,
                f"vector has {len(body.vector)} floats; the most is {settings.steering_max_vector_floats} "
                "(SHORTCUT_STEERING_MAX_VECTOR_FLOATS)",
                param="vector",
                code="vector_too_large",
            )
        if len(body.vector) != c.d_model:
            raise APIError(
                400,
                f"vector has {len(body.vector)} floats; model {served.name!r} needs d_model = {c.d_model}",
                param="vector",
                code="invalid_value",
            )
        vector = torch_vector(body.vector)
        counts, reduce, source = (0, 0), "", "upload"
    else:
        positive, negative = _check_prompts(body, request, served)
        reduce, source = body.reduce or "mean", "contrast"
        vector, counts = await _compute(request, served, contrast_job(positive, negative, body.layer, reduce))
    if not bool(vector.isfinite().all()) or not vector.norm().isfinite():
        raise APIError(400, "the vector is not finite in float32", param="vector", code="invalid_value")
    vec = SteeringVector(
        name=body.name,
        model=served.name,
        checkpoint_sha256=served.sha256,
        layer=body.layer,
        vector=vector,
        positive=counts[0],
        negative=counts[1],
        reduce=reduce,
        source=source,
        created=int(time.time()),
    )
    await run_in_threadpool(store.put, vec, body.replace)
    return info(vec)


def torch_vector(values: list[float]) -> torch.Tensor:
    """The uploaded floats as a float32 tensor."""
    return torch.tensor(values, dtype=torch.float64).float()


async def _compute(
    request: Request, served: ServedModel, job: Callable[[Transformer], Generator[None, None, ContrastResult]]
) -> ContrastResult:
    """Run the contrast job with the diagnostics rules: its share of the worker, the queue cap, the request timeout
    (504) and the client's disconnect (499) both cancel it."""
    result: ContrastResult = await run_job(request, served, job, "making the steering vector")
    return result


@router.get("/steering/vectors", response_model=SteeringVectorList)
async def list_vectors(request: Request) -> dict[str, Any]:
    """Every stored vector's metadata, by name."""
    vectors = await run_in_threadpool(_store(request).list)
    return {"data": [info(v) for v in vectors]}


@router.get("/steering/vectors/{name}", response_model=SteeringVectorFull)
async def get_vector(name: Annotated[VectorName, Path()], request: Request) -> dict[str, Any]:
    """One vector's metadata and its floats."""
    vec = await run_in_threadpool(_store(request).get, name)
    if vec is None:
        raise _not_found(name)
    return {**info(vec), "vector": vec.vector.tolist()}


@router.delete("/steering/vectors/{name}", status_code=204, response_class=Response)
async def delete_vector(name: Annotated[VectorName, Path()], request: Request) -> Response:
    """Delete a vector (on every replica sharing the steering folder)."""
    if not await run_in_threadpool(_store(request).delete, name):
        raise _not_found(name)
    return Response(status_code=204)
