"""POST /hidden_states (the residual stream's vectors, as JSON or a safetensors file) and POST /patching (activation
patching), each a time-shared job on the model's worker (`app.generation.run_job`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.deps import get_served
from app.errors import ERRORS, APIError
from app.generation import run_job
from app.readout_protocol import (
    ITEMSIZE,
    SAFETENSORS,
    HiddenStatesRequest,
    HiddenStatesResponse,
    PatchingRequest,
    PatchingResponse,
    base64_pieces,
    check_bytes,
    check_layers,
    encode,
    one_token,
    tokens_info,
)
from app.service import ServedModel
from app.steering_lookup import resolve
from model import tokenizer
from model.readout import PatchingResult, export_floats, hidden_states, patching, resolve_positions, to_safetensors

router = APIRouter(tags=["readout"], responses=ERRORS)

# Exports are encoded on a worker thread one at a time: each encoding thread competes for the GIL with the engine's
# worker (every decode step needs it), and N of them at once make a step wait up to N switch intervals (5 ms each).
_ENCODING = asyncio.Semaphore(1)


def _ids(text: str, field: str, served: ServedModel) -> list[int]:
    ids = tokenizer.encode(text)
    window = served.checkpoint.config.block_size
    if len(ids) > window:
        raise APIError(
            400,
            f"{field} is {len(ids)} tokens (one token is one UTF-8 byte); the context window is {window} tokens",
            param=field,
            code="context_length_exceeded",
        )
    return ids


def _count(request: Request, served: ServedModel, kind: str, array_bytes: int = 0) -> None:
    request.app.state.metrics.count_readout(served.name, kind, array_bytes)


@router.post(
    "/hidden_states",
    response_model=HiddenStatesResponse,
    responses={200: {"content": {SAFETENSORS: {}}, "description": "JSON, or a safetensors file when asked"}},
)
async def post_hidden_states(body: HiddenStatesRequest, request: Request) -> Response:
    """The vectors of the residual stream at `sites` of `layers` and `positions` of each prompt, from the reference
    forward (with the request's intervention). JSON (`data` as lists or base64), or a safetensors file (`format:
    "safetensors"` or `Accept: application/vnd.safetensors`) with one tensor per (site, layer), named like
    TransformerLens (`blocks.3.hook_resid_post`, shape (prompts, positions, d_model)), the token ids in its
    metadata."""
    served = get_served(request, body.model)
    settings = request.app.state.settings
    c = served.checkpoint.config
    texts = body.texts()
    if len(texts) > settings.max_prompts:
        raise APIError(
            400,
            f"prompts has {len(texts)} prompts; the most is {settings.max_prompts} (SHORTCUT_MAX_PROMPTS)",
            param="prompts",
            code="too_many_prompts",
        )
    field = "prompt" if body.prompt is not None else "prompts"
    prompts = [_ids(t, field if len(texts) == 1 else f"prompts[{i}]", served) for i, t in enumerate(texts)]
    layers = check_layers(body.layers, c.n_layer, "layers")
    positions = []
    for i, ids in enumerate(prompts):
        try:
            positions.append(resolve_positions(body.positions, len(ids)))
        except ValueError as e:
            raise APIError(400, f"{field}[{i}]: {e}", param="positions", code="invalid_value") from None
    safetensors = body.format == "safetensors" or (
        body.format is None and SAFETENSORS in request.headers.get("accept", "")
    )
    if safetensors and len({len(p) for p in positions}) > 1:
        raise APIError(
            400,
            "a safetensors answer holds (prompts, positions, d_model) tensors: the prompts need the same number of "
            'positions; use positions "last" or a list of indices, prompts of one length, or JSON',
            param="positions",
            code="invalid_value",
        )
    n_bytes = export_floats([len(p) for p in positions], len(layers), len(body.sites), c.d_model) * ITEMSIZE[body.dtype]
    check_bytes(n_bytes, settings.hidden_states_max_bytes, "this answer")  # before any forward runs
    iv = resolve(body.intervention, request, served)
    sites = list(body.sites)
    arrays = await run_job(
        request, served, lambda model: hidden_states(model, prompts, layers, sites, positions, iv), "hidden states"
    )
    _count(request, served, "hidden_states", n_bytes)
    if safetensors:
        meta = {
            "model": served.name,
            "checkpoint_sha256": served.sha256,
            "token_ids": prompts,
            "positions": positions,
            "layers": layers,
            "sites": sites,
        }
        arrays = [a.half() if body.dtype == "float16" else a for a in arrays]
        async with _ENCODING:
            data = await run_in_threadpool(to_safetensors, arrays, layers, sites, meta)
        return Response(content=data, media_type=SAFETENSORS)
    P = {len(p) for p in positions}
    answer = {
        "model": served.name,
        "checkpoint_sha256": served.sha256,
        "d_model": c.d_model,
        "tokens": [tokens_info(ids) for ids in prompts],
        "layers": layers,
        "sites": sites,
        "positions": positions,
        "shape": [len(prompts), len(layers), len(sites), P.pop() if len(P) == 1 else None, c.d_model],
        "dtype": body.dtype,
        "encoding": body.encoding,
        "intervention": iv.to_dict() if iv is not None else None,
    }

    def render() -> bytes:  # off the event loop: an answer may be tens of megabytes
        if body.encoding == "base64":  # `data` last, spliced in piece by piece (no one long hold of the GIL)
            head = json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()
            return b"".join([head[:-1], b',"data":"', *base64_pieces(arrays, body.dtype), b'"}'])
        answer["data"] = encode(arrays, body.encoding, body.dtype)
        return json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()

    async with _ENCODING:
        data = await run_in_threadpool(render)
    return Response(content=data, media_type="application/json")


@router.post("/patching", response_model=PatchingResponse)
async def post_patching(body: PatchingRequest, request: Request) -> dict[str, Any]:
    """Activation patching: for each site, layer and position, the corrupt prompt run with that one activation
    replaced by the clean run's, and the metric (target's log-probability after the last position, or its logit
    minus contrast's); `sites` holds the normalized effect (patched - corrupt) / (clean - corrupt), `raw` the
    metric itself. Batched, many patched runs per forward, as a job on the model's worker."""
    served = get_served(request, body.model)
    settings = request.app.state.settings
    c = served.checkpoint.config
    clean, corrupt = _ids(body.clean, "clean", served), _ids(body.corrupt, "corrupt", served)
    if len(clean) != len(corrupt):
        raise APIError(
            400,
            f"clean is {len(clean)} tokens and corrupt is {len(corrupt)} tokens (one token is one UTF-8 byte); "
            "patching needs the same number in both",
            param="corrupt",
            code="invalid_value",
        )
    grid = len(body.sites) * c.n_layer * len(clean)
    if grid > settings.patching_max_grid:
        raise APIError(
            400,
            f"this grid is {len(body.sites)} sites x {c.n_layer} layers x {len(clean)} positions = {grid} patched "
            f"runs; the most is {settings.patching_max_grid} (SHORTCUT_PATCHING_MAX_GRID): use fewer sites or "
            "shorter prompts",
            param="sites",
            code="patching_grid_too_large",
        )
    if body.metric == "logit_diff" and body.contrast is None:
        raise APIError(
            400,
            "metric logit_diff needs contrast (the token whose logit is subtracted)",
            param="contrast",
            code="invalid_value",
        )
    target = one_token(body.target, "target") if body.target is not None else None
    contrast = one_token(body.contrast, "contrast") if body.contrast is not None else None
    iv = resolve(body.intervention, request, served)
    sites = list(body.sites)

    def job(model: Any) -> Any:
        return patching(
            model, clean, corrupt, target=target, metric=body.metric, contrast=contrast, sites=sites, intervention=iv
        )

    res: PatchingResult = await run_job(request, served, job, "patching")
    _count(request, served, "patching")
    return {
        "model": served.name,
        "checkpoint_sha256": served.sha256,
        "metric": body.metric,
        "target": tokens_info([res.target]),
        "contrast": tokens_info([contrast]) if contrast is not None else None,
        "clean_metric": res.clean_metric,
        "corrupt_metric": res.corrupt_metric,
        "tokens": {"clean": tokens_info(clean), "corrupt": tokens_info(corrupt)},
        "sites": res.effect,
        "raw": res.raw,
        "normalized": True,
        "forwards": res.forwards,
        "intervention": iv.to_dict() if iv is not None else None,
    }
