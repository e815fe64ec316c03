"""OpenAI-compatible /v1: completions, chat completions and models.

Every field of OpenAI's requests is either served or refused with a 400 `unsupported_parameter` (unless it holds the
value that changes nothing, e.g. `suffix: null`); unknown fields are refused the same way. Each choice (`n`, or one
per prompt of a list) is its own row of the engine's continuous batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.deps import get_served
from app.errors import APIError, engine_error, error_body
from app.generation import default_max_new, finish_error, stop_tuple
from app.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIRequest,
)
from app.service import ServedModel
from app.sse import sse_event
from model import tokenizer
from model.engine import MAX_SEED, EngineError, FinishEvent, RequestHandle, SamplingParams, TokenEvent
from model.transformer import Transformer

log = logging.getLogger(__name__)

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 429, 503, 504)}
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}  # engine field -> this route's field, for error params
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions (omitted or null)
ROLE_NAMES = {"system": "SYSTEM", "developer": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERRORS)

_NO_TOOLS = "tool and function calling are not served: the model is a plain byte-level LM without a tool format"
# OpenAI (and common vLLM) fields this server does not serve: (values accepted because they change nothing, message)
NOT_SERVED: dict[str, tuple[tuple[object, ...], str]] = {
    "suffix": ((None, ""), "suffix (insertion) is not served: the model only continues text; put it all in prompt"),
    "tools": ((None, []), _NO_TOOLS),
    "tool_choice": ((None, "none"), _NO_TOOLS),
    "parallel_tool_calls": ((None, True, False), _NO_TOOLS),
    "functions": ((None, []), _NO_TOOLS),
    "function_call": ((None, "none"), _NO_TOOLS),
    "response_format": ((None, {"type": "text"}), "only plain text is served (no JSON mode or structured outputs)"),
    "modalities": ((None, ["text"]), "only text is served"),
    "audio": ((None,), "only text is served"),
    "prediction": ((None,), "predicted outputs are not served"),
    "reasoning_effort": ((None,), "not a reasoning model"),
    "verbosity": ((None,), "not served; the length is set by max_tokens and stop"),
    "web_search_options": ((None,), "web search is not served"),
    "store": ((None, False), "completions are not stored"),
    "metadata": ((None, {}), "metadata is only kept with store, which is not served"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "moderation": ((None,), "moderation is not served"),
    "prompt_cache_key": ((None,), "there is no prompt cache"),
    "prompt_cache_retention": ((None,), "there is no prompt cache"),
    "prompt_cache_options": ((None,), "there is no prompt cache"),
    "stop_token_ids": ((None, []), "use stop: a token is a byte, so a one-character stop string does the same"),
    "ignore_eos": ((None, False), "the byte-level model has no end-of-sequence token"),
    "min_tokens": ((None, 0), "not served; generation ends at max_tokens or a stop string"),
    "typical_p": ((None, 1, 1.0), "not served; use top_p, top_k or min_p"),
    "prompt_logprobs": ((None,), "use echo with logprobs (completions)"),
    "use_beam_search": ((None, False), "beam search is not served"),
    "include_stop_str_in_output": ((None, False), "not served; the text ends before the stop string"),
}
MESSAGE_NOT_SERVED: dict[str, tuple[tuple[object, ...], str]] = {
    "tool_calls": ((None, []), _NO_TOOLS),
    "function_call": ((None,), _NO_TOOLS),
    "tool_call_id": ((None,), _NO_TOOLS),
    "refusal": ((None,), "refusal messages are not served"),
    "audio": ((None,), "only text is served"),
    "annotations": ((None, []), "annotations are not served"),
}


def unsupported(param: str, message: str) -> APIError:
    """The 400 for a field this server does not serve."""
    return APIError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


def _refuse_extra(
    extra: dict[str, object] | None, table: dict[str, tuple[tuple[object, ...], str]], prefix: str = ""
) -> None:
    for name, value in (extra or {}).items():
        allowed, message = table.get(name, (None, None))
        if allowed is not None and any(value == a and type(value) is type(a) for a in allowed):
            continue
        if message is None:
            message = (
                "unknown parameter: not an OpenAI field this server serves, nor one of its extensions "
                "(README, OpenAI section, lists them all)"
            )
        raise unsupported(f"{prefix}{name}", message)


def check_common(body: OpenAIRequest, request: Request, rid: str) -> int:
    """Refuse what is not served; return n."""
    _refuse_extra(body.model_extra, NOT_SERVED)
    if body.stream_options is not None:
        if not body.stream:
            raise APIError(
                400, "stream_options is only allowed with stream: true", param="stream_options", code="invalid_value"
            )
        _refuse_extra(body.stream_options.model_extra, {}, "stream_options.")
        if body.stream_options.include_obfuscation:
            raise unsupported("stream_options.include_obfuscation", "stream obfuscation is not served")
    n = body.n or 1
    limit = request.app.state.settings.max_n
    if n > limit:
        raise APIError(400, f"n must be at most {limit} (SHORTCUT_MAX_N)", param="n", code="invalid_value")
    for name in ("user", "safety_identifier"):
        if (who := getattr(body, name, None)) is not None:
            log.info("%s: %s %r", rid, name, who)
    return n


def choice_seed(seed: int | None, i: int) -> int | None:
    """The seed of choice `i`: `seed` itself for choice 0, else the first 63 bits of sha256(f"{seed}:{i}")."""
    if seed is None or i == 0:
        return seed
    return (int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") >> 1) & MAX_SEED


def sampling_params(
    body: OpenAIRequest, max_new: int, seed: int | None, logprobs: int, stop: tuple[str, ...]
) -> SamplingParams:
    """Engine parameters of one row (null fields take OpenAI's / the extension's neutral value)."""
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stop,
        seed=seed,
        logprobs=logprobs,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        min_p=body.min_p or 0.0,
        logit_bias=tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()),
        intervention=body.intervention.to_engine() if body.intervention else None,
        trace=body.trace,
        logit_lens_top=body.logit_lens_top,
    )


def extensions(row: Row, tokens: list[Scored]) -> dict:
    """The extension fields of one choice (or chunk): `trace` of its tokens, only when asked for."""
    return {"trace": [t.trace for t in tokens]} if row.params.traced else {}


def applied(params: SamplingParams) -> dict:
    """The response's `intervention` echo (every row of a request has the same), only when one was applied."""
    iv = params.intervention
    return {"intervention": iv.to_dict()} if iv is not None else {}


@dataclass
class Row:
    """One choice: which prompt, its tokens and its engine parameters."""

    index: int
    prompt_index: int
    ids: list[int]
    text: str
    params: SamplingParams


def submit_rows(served: ServedModel, rows: list[Row], names: dict[str, str] = OPENAI_NAMES) -> list[RequestHandle]:
    """Validate every row, then queue them all (on a refusal, the rows already queued are cancelled); engine
    fields in errors are renamed by `names`."""
    engine, handles = served.engine, []
    try:
        for row in rows:
            engine.validate(row.ids, row.params)
        for row in rows:
            handles.append(engine.submit(row.ids, row.params))
    except EngineError as e:
        for h in handles:
            h.cancel()
        raise engine_error(e, names) from None
    return handles


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_all(request: Request, handles: list[RequestHandle]) -> list[tuple[list[TokenEvent], FinishEvent]]:
    """Every row's result; a client that goes away cancels them all. A row that failed raises its API error."""
    results = asyncio.ensure_future(asyncio.gather(*(h.result() for h in handles)))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not results.done():  # the client left first: 499 in the log and metrics (nobody reads the answer)
            for h in handles:
                h.cancel()
            raise APIError(499, "client closed the request", code="client_closed_request")
        out = await results
    finally:
        gone.cancel()
        if not results.done():
            for h in handles:
                h.cancel()
            results.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gone
    for _, fin in out:
        if (err := finish_error(fin)) is not None:
            raise err
    return out


async def merged_events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
    """(row, event) pairs of all rows as they come; leaving early cancels every row."""
    queue: asyncio.Queue[tuple[int, TokenEvent | FinishEvent]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        async for ev in handle:
            await queue.put((i, ev))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    finished = 0
    try:
        while finished < len(handles):
            i, ev = await queue.get()
            finished += isinstance(ev, FinishEvent)
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        if finished < len(handles):
            for h in handles:
                h.cancel()


# ---- logprobs -----------------------------------------------------------------------------------------------------


@dataclass
class Scored:
    """A token with its logprob and the top alternatives (None for a prompt's first token: nothing predicts it)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    trace: dict | None = None  # the per-token trace, when asked for


def scored(ev: TokenEvent) -> Scored:
    return Scored(ev.token_id, ev.logprob, ev.top_logprobs, ev.trace)


def prompt_logprobs_job(ids: list[int], k: int) -> Callable[[Transformer], object]:
    """An engine job: one forward over the prompt; each token after the first with its logprob and top-k."""

    def job(model: Transformer):  # noqa: ANN202 - a generator for Engine.run_job
        idx = torch.tensor([ids], device=next(model.parameters()).device)
        logits = model(idx).logits[0, :-1].float()  # (T-1, V): position t predicts token t+1
        yield
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(1, idx[0, 1:, None]).squeeze(1).tolist()
        values, top_ids = logp.topk(max(k, 1), dim=-1)
        out = [Scored(ids[0], None, None)]
        for t, lp, v, i in zip(ids[1:], chosen, values.tolist(), top_ids.tolist(), strict=True):
            out.append(Scored(t, lp, list(zip(i, v, strict=True))))
        return out

    return job


async def prompt_logprobs(served: ServedModel, ids: list[int], k: int) -> list[Scored]:
    return await asyncio.wrap_future(served.engine.run_job(prompt_logprobs_job(ids, k)))


class Offsets:
    """Character offset of each token in the text that its bytes decode to (a multi-byte character's bytes share it)."""

    def __init__(self, start: int = 0) -> None:
        self.pos, self.decoder = start, tokenizer.IncrementalDecoder()

    def next(self, token_id: int) -> int:
        at = self.pos
        self.pos += len(self.decoder.push(token_id))
        return at


def completion_logprobs(tokens: list[Scored], k: int, offsets: Offsets) -> CompletionLogprobs:
    """OpenAI's completions logprobs: each token's logprob and a dict of the top k plus the token itself (k+1 at
    most, as OpenAI and vLLM return)."""
    tops: list[dict[str, float] | None] = []
    for t in tokens:
        if t.top is None:
            tops.append(None)
            continue
        d = {tokenizer.token_text(i): lp for i, lp in t.top[:k]}
        d.setdefault(tokenizer.token_text(t.token_id), t.logprob)
        tops.append(d)
    return CompletionLogprobs(
        tokens=[tokenizer.token_text(t.token_id) for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=tops,
        text_offset=[offsets.next(t.token_id) for t in tokens],
    )


def chat_logprobs(tokens: list[Scored], k: int) -> ChatLogprobs:
    """OpenAI's chat logprobs: each token with its logprob, its bytes and the top k alternatives."""

    def top(i: int, lp: float) -> ChatTopLogprob:
        return ChatTopLogprob(token=tokenizer.token_text(i), logprob=lp, bytes=[i])

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **top(t.token_id, t.logprob).model_dump(), top_logprobs=[top(i, lp) for i, lp in (t.top or [])[:k]]
            )
            for t in tokens
        ]
    )


# ---- responses ----------------------------------------------------------------------------------------------------


def usage(rows: list[Row], fins: list[FinishEvent]) -> dict[str, int]:
    """Each prompt counts once, however many choices it has (as OpenAI counts)."""
    prompt = sum(len(r.ids) for r in {r.prompt_index: r for r in rows}.values())
    completion = sum(f.completion_tokens for f in fins)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_fields(
    cid: str, created: int, served: ServedModel, rows: list[Row], results: list[tuple[list[TokenEvent], FinishEvent]]
) -> dict[str, Any]:
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


def fingerprint(served: ServedModel) -> str:
    return f"sha256-{served.sha256[:16]}"


def sse(data: dict | BaseModel) -> str:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return sse_event(data)


def include_usage(body: OpenAIRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def stream_rows(
    rows: list[Row],
    handles: list[RequestHandle],
    head: dict,
    want_usage: bool,
    opening: Callable[[Row], list[dict]],
    delta: Callable[[Row, str, list[Scored], str | None], dict],
) -> AsyncIterator[str]:
    """SSE for all rows: each row's `opening` choices, then one chunk per released text (held-back tokens ride on
    the chunk that releases their text; no empty-text chunks), a finish chunk per row, and with `want_usage` a
    final chunk with `choices: []` and the usage (other chunks then carry `usage: null`)."""
    extra = {"usage": None} if want_usage else {}

    def chunk(choices: list[dict]) -> str:
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


def streaming(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


# ---- /v1/completions ----------------------------------------------------------------------------------------------


def completion_prompts(body: CompletionRequest, limit: int) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt; `prompt` may be a string, strings, token ids or lists of token ids."""
    p = body.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    if len(prompts) > limit:
        raise APIError(
            400, f"at most {limit} prompts per request (SHORTCUT_MAX_PROMPTS)", param="prompt", code="invalid_value"
        )
    out = []
    for q in prompts:
        if isinstance(q, str):
            out.append((tokenizer.encode(q), q))
        elif any(not 0 <= t < tokenizer.VOCAB_SIZE for t in q):
            raise APIError(
                400,
                f"token ids must be in 0..{tokenizer.VOCAB_SIZE - 1} (one per byte)",
                param="prompt",
                code="invalid_value",
            )
        else:
            out.append((list(q), tokenizer.decode(q)))
    return out


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}},
)
async def completions(body: CompletionRequest, request: Request):
    """Text completions, compatible with the `openai` client: `n` choices per prompt, lists of prompts, echo."""
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    n = check_common(body, request, cid)
    if body.best_of not in (None, 1, n):
        raise unsupported("best_of", "best_of > n is not served; ask for n choices with logprobs and rank them")
    served = get_served(request, body.model)
    settings = request.app.state.settings
    k = body.logprobs
    rows = []
    for p_i, (ids, text) in enumerate(completion_prompts(body, settings.max_prompts)):
        max_new = body.max_tokens or default_max_new(served, len(ids), COMPLETION_DEFAULT_MAX_TOKENS)
        for j in range(n):
            i = p_i * n + j  # OpenAI's order: the choices of prompt 0, then of prompt 1, ...
            params = sampling_params(
                body, max_new, choice_seed(body.seed, i), 0 if k is None else max(k, 1), stop_tuple(body.stop)
            )
            rows.append(Row(i, p_i, ids, text, params))
    handles = submit_rows(served, rows)
    prompt_lp: dict[int, list[Scored]] = {}
    try:
        if body.echo and k is not None:
            for r in rows:
                if r.prompt_index not in prompt_lp:
                    prompt_lp[r.prompt_index] = await prompt_logprobs(served, r.ids, k)
    except BaseException:
        for h in handles:
            h.cancel()
        raise

    if not body.stream:
        results = await collect_all(request, handles)
        choices = []
        for row, (tokens, fin) in zip(rows, results, strict=True):
            toks = [scored(t) for t in tokens]
            lp = None
            if k is not None:
                echoed = prompt_lp[row.prompt_index] if body.echo else []
                lp = completion_logprobs(echoed + toks, k, Offsets())
            choices.append(
                CompletionChoice(
                    text=(row.text if body.echo else "") + fin.text,
                    index=row.index,
                    finish_reason=fin.reason,
                    logprobs=lp,
                    **extensions(row, toks),
                )
            )
        return CompletionResponse(choices=choices, **response_fields(cid, created, served, rows, results))

    head = chunk_head(cid, "text_completion", created, served)
    offsets = {r.index: Offsets() for r in rows}

    def lp_of(row: Row, tokens: list[Scored]) -> dict | None:
        return None if k is None else completion_logprobs(tokens, k, offsets[row.index]).model_dump()

    def opening(row: Row) -> list[dict]:
        if not body.echo:
            return []
        return [
            {
                "text": row.text,
                "index": row.index,
                "finish_reason": None,
                "logprobs": lp_of(row, prompt_lp.get(row.prompt_index, [])),
            }
        ]

    def delta(row: Row, text: str, tokens: list[Scored], finish: str | None) -> dict:
        return {
            "text": text,
            "index": row.index,
            "finish_reason": finish,
            "logprobs": lp_of(row, tokens),
            **extensions(row, tokens),
        }

    return streaming(stream_rows(rows, handles, head, include_usage(body), opening, delta))


# ---- /v1/chat/completions -----------------------------------------------------------------------------------------

_CUT = "\x00\x01content\x01\x00"


def render_chat(template: str, body: ChatCompletionRequest) -> tuple[str, str]:
    """(prompt, turn end): every message as a turn of `template`, then the assistant's turn left open.

    A message's speaker is its `name`, else ROLE_NAMES[role]; the open turn's speaker is the last assistant
    message's name, else ASSISTANT. Text parts of a message are joined with a newline (as vLLM does).
    """
    turns, speaker = [], ROLE_NAMES["assistant"]
    for i, m in enumerate(body.messages):
        if m.role in ("tool", "function"):
            raise unsupported(f"messages.{i}.role", _NO_TOOLS)
        _refuse_extra(m.model_extra, MESSAGE_NOT_SERVED, f"messages.{i}.")
        if m.content is None:
            raise APIError(
                400,
                f"messages.{i}.content: a message needs content",
                param=f"messages.{i}.content",
                code="invalid_value",
            )
        if isinstance(m.content, str):
            content = m.content
        else:
            texts = []
            for part in m.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                    raise unsupported(
                        f"messages.{i}.content", "only text parts ({'type': 'text', 'text': ...}) are served"
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        name = m.name or ROLE_NAMES[m.role]
        if m.role == "assistant" and m.name:
            speaker = m.name
        turns.append(template.format(name=name, content=content))
    opened, end = template.format(name=speaker, content=_CUT).split(_CUT)
    return "".join(turns) + opened, end


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Chat, rendered as a play script (SHORTCUT_CHAT_TEMPLATE); the reply ends at the next turn marker."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    n = check_common(body, request, cid)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
        raise APIError(
            400,
            "max_tokens is a deprecated alias of max_completion_tokens; give one of them",
            param="max_tokens",
            code="invalid_value",
        )
    served = get_served(request, body.model)
    settings = request.app.state.settings
    prompt, turn_end = render_chat(settings.chat_template, body)
    ids = tokenizer.encode(prompt)
    max_new = (
        body.max_completion_tokens
        or body.max_tokens
        or default_max_new(served, len(ids), settings.default_max_new_tokens)
    )
    k = (body.top_logprobs or 0) if body.logprobs else None
    stop = tuple(dict.fromkeys((turn_end, *stop_tuple(body.stop))))
    rows = [
        Row(
            i,
            0,
            ids,
            prompt,
            sampling_params(body, max_new, choice_seed(body.seed, i), 0 if k is None else max(k, 1), stop),
        )
        for i in range(n)
    ]
    max_name = "max_tokens" if body.max_tokens else "max_completion_tokens"
    handles = submit_rows(served, rows, {"max_new_tokens": max_name, "logprobs": "top_logprobs"})

    if not body.stream:
        results = await collect_all(request, handles)
        choices = []
        for row, (tokens, fin) in zip(rows, results, strict=True):
            toks = [scored(t) for t in tokens]
            choices.append(
                ChatChoice(
                    index=row.index,
                    message=ChatMessageOut(content=fin.text),
                    finish_reason=fin.reason,
                    logprobs=None if k is None else chat_logprobs(toks, k),
                    **extensions(row, toks),
                )
            )
        return ChatCompletionResponse(choices=choices, **response_fields(cid, created, served, rows, results))

    head = chunk_head(cid, "chat.completion.chunk", created, served)

    def opening(row: Row) -> list[dict]:
        return [
            {"index": row.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ]

    def delta(row: Row, text: str, tokens: list[Scored], finish: str | None) -> dict:
        lp = None if k is None else chat_logprobs(tokens, k).model_dump()
        return {
            "index": row.index,
            "delta": {"content": text} if text else {},
            "logprobs": lp,
            "finish_reason": finish,
            **extensions(row, tokens),
        }

    return streaming(stream_rows(rows, handles, head, include_usage(body), opening, delta))


# ---- /v1/models ---------------------------------------------------------------------------------------------------


def model_card(m: ServedModel) -> ModelCard:
    c = m.checkpoint.config
    return ModelCard(
        id=m.name,
        created=m.created,
        n_layer=c.n_layer,
        d_model=c.d_model,
        context_window=c.block_size,
        residual=c.residual,
        checkpoint_sha256=m.sha256,
    )


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The served models."""
    return ModelList(data=[model_card(m) for m in request.app.state.models.values()])


@router.get("/models/{model_id}", response_model=ModelCard)
async def model(model_id: str, request: Request) -> ModelCard:
    """One served model, or a 404."""
    m = request.app.state.models.get(model_id)
    if m is None:
        raise APIError(
            404,
            f"model '{model_id}' not found; GET /v1/models lists the served models",
            param="model",
            code="model_not_found",
        )
    return model_card(m)
