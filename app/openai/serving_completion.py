"""/v1/completions: `n` choices per prompt, lists of prompts, echo (with the prompt's logprobs), JSON or SSE."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from app.deps import get_served
from app.generation import collect, default_max_new
from app.openai.logprobs import Offsets, Scored, completion_logprobs, prompt_logprobs, scored
from app.openai.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from app.openai.serving import Row, check, chunk_head, extensions, response_fields, stream_rows, submit_rows
from app.sse import sse_response
from app.steering_lookup import resolve


async def create_completion(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
    """Queue every choice of every prompt; answer with the whole result, or stream it."""
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    n = check(body, request, cid)
    served = get_served(request, body.model)
    settings = request.app.state.settings
    k = body.logprobs
    iv = resolve(body.intervention, request, served)
    rows = []
    for p_i, (ids, text) in enumerate(body.prompts(settings.max_prompts)):
        default = default_max_new(served, len(ids), body.DEFAULT_MAX_TOKENS)
        for j in range(n):
            i = p_i * n + j  # OpenAI's order: the choices of prompt 0, then of prompt 1, ...
            rows.append(Row(i, p_i, ids, text, body.to_sampling_params(default, i, iv)))
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
