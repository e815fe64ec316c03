"""GET/POST /diagnostics: the residual stream of the live model, as JSON or an 80-column text report."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from app.deps import get_served
from app.errors import ERRORS, APIError
from app.generation import run_job
from app.schemas import ByteIds, DiagnosticsResponse, InterventionSpec, ModelName, not_a_bool, not_a_number
from app.service import ServedModel
from app.steering_lookup import resolve
from model import tokenizer
from model.diagnostics import DiagnosticsOptions, iter_diagnostics, render_text
from model.lens import no_lens_message

Flag = Annotated[bool, BeforeValidator(not_a_number)]  # "true" in a query string, true in JSON; never 0/1
router = APIRouter(tags=["diagnostics"], responses=ERRORS)


class DiagnosticsRequest(BaseModel):
    """What to compute; every field is also a query parameter of GET /diagnostics."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, description="text whose residual stream is examined")
    model: ModelName | None = None
    per_token: Flag = Field(False, description="include per-position norms")
    logit_lens: Annotated[int, Field(ge=0, le=256), BeforeValidator(not_a_bool)] = Field(
        0, description="top-K tokens per layer from the logit lens; 0 = off"
    )
    tuned_lens: Annotated[int, Field(ge=0, le=256), BeforeValidator(not_a_bool)] = Field(
        0, description="top-K tokens per layer from the tuned lens (the model's trained translators); 0 = off"
    )
    gradients: Flag = Field(False, description="gradient norm reaching each layer's input")
    ablation: Flag = Field(False, description="loss change when each block / attention / MLP is skipped")
    format: Literal["json", "text"] | None = Field(None, description="default json; text for a terminal report")


class DiagnosticsBody(DiagnosticsRequest):
    """POST /diagnostics: the query's fields, and an intervention applied to every forward pass."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["tokens"]}]}
    )
    intervention: InterventionSpec | None = Field(
        None, description="as on /generate: skip or scale blocks' F(x), add steering vectors"
    )
    prompt: Annotated[str, Field(min_length=1)] | SkipJsonSchema[None] = Field(  # type: ignore[assignment]
        None, description="text whose residual stream is examined"
    )
    tokens: ByteIds | SkipJsonSchema[None] = Field(
        None,
        description="instead of prompt: the token ids (bytes) to examine, e.g. a generation's own tokens, which "
        "need not be valid UTF-8",
    )

    @model_validator(mode="after")
    def _one_input(self) -> DiagnosticsBody:
        if (self.prompt is None) == (self.tokens is None):
            raise ValueError("give exactly one of prompt (text) or tokens (byte ids)")
        return self


def _wants_text(req: DiagnosticsRequest, request: Request) -> bool:
    if req.format is not None:
        return req.format == "text"
    accept = request.headers.get("accept", "")
    return "text/plain" in accept and "application/json" not in accept


async def _diagnose(req: DiagnosticsRequest, request: Request, intervention: InterventionSpec | None = None):
    served: ServedModel = get_served(request, req.model)
    tokens = getattr(req, "tokens", None)
    ids = list(tokens) if tokens is not None else tokenizer.encode(req.prompt or "")
    window = served.checkpoint.config.block_size
    if len(ids) > window:
        name = "tokens" if tokens is not None else "prompt"
        raise APIError(
            400,
            f"{name} is {len(ids)} tokens (one token is one UTF-8 byte); the context window is {window} tokens",
            param=name,
            code="context_length_exceeded",
        )
    if req.tuned_lens > 0 and served.lens is None:
        raise APIError(
            400, no_lens_message(served.name, served.checkpoint.path), param="tuned_lens", code="invalid_value"
        )
    c = served.checkpoint.config
    iv = resolve(intervention, request, served)  # checked against the model: a 400 naming the entry
    opts = DiagnosticsOptions(
        per_token=req.per_token,
        logit_lens=req.logit_lens,
        tuned_lens=req.tuned_lens,
        gradients=req.gradients,
        ablation=req.ablation,
        intervention=iv,
    )
    info = {
        "name": served.name,
        "n_layer": c.n_layer,
        "d_model": c.d_model,
        "residual": c.residual,
        "checkpoint_sha256": served.sha256,
    }
    lens = served.lens if req.tuned_lens > 0 else None
    result = await run_job(request, served, lambda model: iter_diagnostics(model, ids, opts, info, lens), "diagnostics")
    if _wants_text(req, request):
        return PlainTextResponse(render_text(result))
    return JSONResponse(result)


TEXT_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {
        "model": DiagnosticsResponse,
        "content": {"text/plain": {}},
        "description": "diagnostics as JSON, or a plain-text report with format=text",
    }
}


@router.get("/diagnostics", responses=TEXT_OR_JSON)
async def diagnostics_get(req: Annotated[DiagnosticsRequest, Query()], request: Request):
    """Per-layer residual-stream figures for `prompt` (curl-friendly: every option is a query parameter)."""
    return await _diagnose(req, request)


@router.post("/diagnostics", responses=TEXT_OR_JSON)
async def diagnostics_post(req: DiagnosticsBody, request: Request):
    """Same as GET /diagnostics, with a JSON body, which may also carry an `intervention`."""
    return await _diagnose(req, request, req.intervention)
