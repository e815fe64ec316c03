"""/v1/completions: `n` choices per prompt, lists of prompts, echo (with the prompt's logprobs), JSON or SSE."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from app.deps import get_served
from app.errors import APIError
from app.generation import check_answer_size, collect, default_max_new, json_answer
from app.openai.logprobs import Offsets, Scored, completion_logprobs, prompt_logprobs, scored
from app.openai.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from app.openai.serving import (
    Row,
    check,
    chunk_head,
    extensions,
    fingerprint,
    response_fields,
    sse,
    stream_rows,
    submit_rows,
)
from app.sse import sse_response
from app.steering_lookup import resolve


async def create_completion(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
    """Queue every choice of every prompt; answer with the whole result, or stream it."""
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    n = check(body, request, cid)
    served = get_served(request, body.model)
    settings = request.app.state.settings
    if body.score_only:
        return await score_prompts(body, request, cid, created, n)
    k = body.logprobs
    iv = resolve(body.intervention, request, served)
    rows = []
    for p_i, (ids, text) in enumerate(body.prompts(settings.max_prompts)):
        default = default_max_new(served, len(ids), body.DEFAULT_MAX_TOKENS)
        for j in range(n):
            i = p_i * n + j  # OpenAI's order: the choices of prompt 0, then of prompt 1, ...
            rows.append(Row(i, p_i, ids, text, body.to_sampling_params(default, i, iv)))
    size = check_answer_size(request, served, [(r.params, len(r.ids) if body.echo else 0) for r in rows])
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
        results = await collect(request, handles)

        def build() -> CompletionResponse:
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

        return await json_answer(build, size)

    head = chunk_head(cid, "text_completion", created, served)
    offsets = {r.index: Offsets() for r in rows}

    def lp_of(row: Row, tokens: list[Scored]) -> dict[str, Any] | None:
        return None if k is None else completion_logprobs(tokens, k, offsets[row.index]).model_dump()

    def opening(row: Row) -> list[dict[str, Any]]:
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

    def delta(row: Row, text: str, tokens: list[Scored], finish: str | None) -> dict[str, Any]:
        return {
            "text": text,
            "index": row.index,
            "finish_reason": finish,
            "logprobs": lp_of(row, tokens),
            **extensions(row, tokens),
        }

    return sse_response(stream_rows(rows, handles, head, body.include_usage, opening, delta))


async def score_prompts(
    body: CompletionRequest, request: Request, cid: str, created: int, n: int
) -> CompletionResponse | StreamingResponse:
    """max_tokens 0 with echo (as OpenAI and vLLM serve it: how a client scores a text): each choice is its prompt,
    with the prompt's logprobs when asked for, and finish_reason "length"; nothing is generated, so a prompt may
    fill the whole context window."""
    served = get_served(request, body.model)
    settings = request.app.state.settings
    for name in ("intervention", "trace", "logit_lens_top"):
        if getattr(body, name):
            raise APIError(
                400,
                f"{name}: max_tokens 0 scores the prompt with the unedited model and generates no token to trace; "
                "send max_tokens >= 1",
                param=name,
                code="unsupported_parameter",
            )
    k = body.logprobs
    if k is not None and k > settings.max_logprobs:
        raise APIError(400, f"logprobs must be in 0..{settings.max_logprobs}", param="logprobs", code="invalid_value")
    window = served.checkpoint.config.block_size
    prompts = body.prompts(settings.max_prompts)
    for ids, _ in prompts:
        if not ids:
            raise APIError(400, "prompt is empty: there is nothing to score", param="prompt", code="invalid_value")
        if len(ids) > window:
            raise APIError(
                400,
                f"prompt is {len(ids)} tokens (one token is one UTF-8 byte), over the context window of {window} "
                f"tokens; a prompt scored with max_tokens 0 may be at most {window} bytes",
                param="prompt",
                code="context_length_exceeded",
            )
    scores = [await prompt_logprobs(served, ids, k) if k is not None else [] for ids, _ in prompts]
    choices = [
        CompletionChoice(
            text=text,
            index=p_i * n + j,
            finish_reason="length",
            logprobs=completion_logprobs(scores[p_i], k, Offsets()) if k is not None else None,
        )
        for p_i, (_, text) in enumerate(prompts)
        for j in range(n)
    ]
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
    if not body.stream:
        return CompletionResponse(
            id=cid,
            created=created,
            model=served.name,
            choices=choices,
            usage=usage,
            system_fingerprint=fingerprint(served),
        )
    head = chunk_head(cid, "text_completion", created, served)
    extra = {"usage": None} if body.include_usage else {}

    async def events() -> AsyncIterator[str]:
        for c in choices:
            yield sse({**head, "choices": [c.model_dump(mode="json")], **extra})
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    return sse_response(events())
