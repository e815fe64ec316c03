"""What /v1/completions and /v1/chat/completions share: each choice a row of the engine's batch, queued together,
collected or streamed as SSE, and the response fields around the choices."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from app.errors import APIError, engine_error, error_body
from app.generation import finish_error, merged_events
from app.openai.logprobs import Scored, scored
from app.openai.protocol import ModelCard, OpenAIRequest
from app.service import ServedModel
from app.sse import sse_event
from model.engine import EngineError, FinishEvent, RequestHandle, SamplingParams, TokenEvent

log = logging.getLogger(__name__)

OPENAI_NAMES = {"max_new_tokens": "max_tokens"}  # engine field -> the route's field, for error params
Results = list[tuple[list[TokenEvent], FinishEvent]]


@dataclass
class Row:
    """One choice: which prompt, its tokens and its engine parameters."""

    index: int
    prompt_index: int
    ids: list[int]
    text: str
    params: SamplingParams


def check(body: OpenAIRequest, request: Request, rid: str) -> int:
    """The request's own checks (400s for what is not served); logs who asked, when told. Returns n."""
    n = body.check(request.app.state.settings.max_n)
    for name in ("user", "safety_identifier"):
        if (who := getattr(body, name, None)) is not None:
            log.info("%s: %s %r", rid, name, who)
    return n


def submit_rows(served: ServedModel, rows: list[Row], names: Mapping[str, str] = OPENAI_NAMES) -> list[RequestHandle]:
    """Validate every row, then queue them all (on a refusal, the rows already queued are cancelled); engine
    fields in errors are renamed by `names`."""
    engine, handles = served.engine, []
    group = object()  # the rows of one request: admitted fairly next to other requests
    try:
        for row in rows:
            engine.validate(row.ids, row.params)
        for row in rows:
            handles.append(engine.submit(row.ids, row.params, group))
    except EngineError as e:
        for h in handles:
            h.cancel()
        raise engine_error(e, names) from None
    return handles


def extensions(row: Row, tokens: list[Scored]) -> dict[str, Any]:
    """The extension fields of one choice (or chunk): `trace` of its tokens, only when asked for."""
    return {"trace": [t.trace for t in tokens]} if row.params.traced else {}


def applied(params: SamplingParams) -> dict[str, Any]:
    """The response's `intervention` echo (every row of a request has the same), only when one was applied."""
    iv = params.intervention
    return {"intervention": iv.to_dict()} if iv is not None else {}


def usage(rows: list[Row], fins: list[FinishEvent]) -> dict[str, int]:
    """Each prompt counts once, however many choices it has (as OpenAI counts)."""
    prompt = sum(len(r.ids) for r in {r.prompt_index: r for r in rows}.values())
    completion = sum(f.completion_tokens for f in fins)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def fingerprint(served: ServedModel) -> str:
    return f"sha256-{served.sha256[:16]}"


def response_fields(cid: str, created: int, served: ServedModel, rows: list[Row], results: Results) -> dict[str, Any]:
    """What a non-streamed completion and a chat completion share besides their choices."""
    return {
        "id": cid,
        "created": created,
        "model": served.name,
        "usage": usage(rows, [f for _, f in results]),
        "system_fingerprint": fingerprint(served),
        **applied(rows[0].params),
    }


def chunk_head(cid: str, obj: str, created: int, served: ServedModel) -> dict[str, Any]:
    """The fields every streamed chunk of one response repeats."""
    return {
        "id": cid,
        "object": obj,
        "created": created,
        "model": served.name,
        "system_fingerprint": fingerprint(served),
    }


def sse(data: dict[str, Any] | BaseModel) -> str:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return sse_event(data)


async def stream_rows(
    rows: list[Row],
    handles: list[RequestHandle],
    head: dict[str, Any],
    want_usage: bool,
    opening: Callable[[Row], list[dict[str, Any]]],
    delta: Callable[[Row, str, list[Scored], str | None], dict[str, Any]],
) -> AsyncIterator[str]:
    """SSE for all rows: each row's `opening` choices, then one chunk per released text (held-back tokens ride on
    the chunk that releases their text; no empty-text chunks), a finish chunk per row, and with `want_usage` a
    final chunk with `choices: []` and the usage (other chunks then carry `usage: null`)."""
    extra = {"usage": None} if want_usage else {}

    def chunk(choices: list[dict[str, Any]]) -> str:
        return sse({**head, "choices": choices, **extra})

    for row in rows:
        for choice in opening(row):
            yield chunk([choice])
    pending: list[list[Scored]] = [[] for _ in rows]
    fins: list[FinishEvent | None] = [None] * len(rows)
    failed = False
    async with contextlib.aclosing(merged_events(handles)) as events:  # closing it cancels the rows left
        async for i, ev in events:
            row = rows[i]
            if isinstance(ev, TokenEvent):
                pending[i].append(scored(ev))
                if ev.text:
                    yield chunk([delta(row, ev.text, pending[i], None)])
                    pending[i] = []
                continue
            err = finish_error(ev)
            if err is not None:
                yield sse(error_body(err.status, err.message, err.param, err.code))
                failed = True
                break
            fins[i] = ev
            yield chunk([delta(row, "", pending[i], ev.reason)])
            pending[i] = []
    if want_usage and not failed:
        yield sse({**head, "choices": [], "usage": usage(rows, [f for f in fins if f is not None])})
    yield "data: [DONE]\n\n"


def model_card(m: ServedModel, root: str | None = None) -> ModelCard:
    """The card of a served model; `root` is the model an alias names (the card's id is then the alias)."""
    c = m.checkpoint.config
    return ModelCard(
        id=m.name,
        created=m.created,
        root=root or m.name,
        n_layer=c.n_layer,
        d_model=c.d_model,
        context_window=c.block_size,
        residual=c.residual,
        checkpoint_sha256=m.sha256,
        tuned_lens=m.lens is not None,
    )


def model_cards(models: Mapping[str, ServedModel], aliases: Mapping[str, str]) -> list[ModelCard]:
    """Every served model, then every alias (SHORTCUT_MODEL_ALIASES), as vLLM lists each served model name."""
    cards = [model_card(m) for m in models.values()]
    cards += [model_card(replace(models[t], name=a), root=t) for a, t in aliases.items() if t in models]
    return cards


def find_model(models: Mapping[str, ServedModel], aliases: Mapping[str, str], model_id: str) -> ModelCard:
    """The card of one served model or alias, or a 404."""
    for card in model_cards(models, aliases):
        if card.id == model_id:
            return card
    raise APIError(
        404,
        f"model '{model_id}' not found; GET /v1/models lists the served models",
        param="model",
        code="model_not_found",
    )
