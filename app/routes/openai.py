"""OpenAI-compatible /v1/completions and /v1/models."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.deps import get_served
from app.errors import error_body
from app.generation import collect, default_max_new, finish_error, stop_tuple, stream_events, submit
from app.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from app.service import ServedModel
from model import tokenizer
from model.engine import FinishEvent, SamplingParams, TokenEvent

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 429, 503, 504)}
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}  # engine field -> this route's field, for error params

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERRORS)


def completion_logprobs(tokens: list[TokenEvent], offset: int) -> CompletionLogprobs:
    """OpenAI legacy-completions logprobs object for `tokens`, text offsets starting at `offset`."""
    texts = [tokenizer.token_text(t.token_id) for t in tokens]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    tops = [{tokenizer.token_text(i): lp for i, lp in (t.top_logprobs or [])} for t in tokens]
    return CompletionLogprobs(tokens=texts, token_logprobs=[t.logprob for t in tokens], top_logprobs=tops,
                              text_offset=offsets)


def _usage(fin: FinishEvent) -> dict[str, int]:
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
            "total_tokens": fin.prompt_tokens + fin.completion_tokens}


def _fingerprint(served: ServedModel) -> str:
    return f"sha256-{served.sha256[:16]}"


@router.post("/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
async def completions(body: CompletionRequest, request: Request):
    """Legacy text completions, compatible with the `openai` client (n=1)."""
    served = get_served(request, body.model)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    n_prompt = len(tokenizer.encode(prompt))
    max_new = body.max_tokens or default_max_new(served, n_prompt, request.app.state.settings.default_max_new_tokens)
    params = SamplingParams(
        max_new_tokens=max_new, temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p, stop=stop_tuple(body.stop),
        seed=body.seed, logprobs=body.logprobs or 0,
    )
    handle, _ = submit(served, prompt, params, OPENAI_NAMES)
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    want_lp = body.logprobs is not None

    if not body.stream:
        tokens, fin = await collect(request, handle)
        err = finish_error(fin)
        if err is not None:
            raise err
        choice = CompletionChoice(text=fin.text, index=0, finish_reason=fin.reason,
                                  logprobs=completion_logprobs(tokens, 0) if want_lp else None)
        return CompletionResponse(id=cid, created=created, model=served.name, choices=[choice], usage=_usage(fin),
                                  system_fingerprint=_fingerprint(served))

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(text: str, finish: str | None, lp: CompletionLogprobs | None, usage: dict | None = None) -> str:
        data = {"id": cid, "object": "text_completion", "created": created, "model": served.name,
                "system_fingerprint": _fingerprint(served),
                "choices": [{"text": text, "index": 0, "finish_reason": finish,
                             "logprobs": lp.model_dump() if lp else None}]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        offset = 0
        async for ev in stream_events(handle):
            if isinstance(ev, TokenEvent):
                yield chunk(ev.text, None, completion_logprobs([ev], offset) if want_lp else None)
                offset += len(ev.text)
                continue
            err = finish_error(ev)
            if err is not None:
                yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
            else:
                yield chunk("", ev.reason, None, _usage(ev) if include_usage else None)
            yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The served models."""
    cards = []
    for m in request.app.state.models.values():
        c = m.checkpoint.config
        cards.append(ModelCard(id=m.name, created=m.created, n_layer=c.n_layer, d_model=c.d_model,
                               context_window=c.block_size, residual=c.residual, checkpoint_sha256=m.sha256))
    return ModelList(data=cards)
