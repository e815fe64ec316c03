"""/v1/chat/completions: the messages rendered as a play script, `n` choices, JSON or SSE."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from app.deps import get_served
from app.generation import check_answer_size, collect, default_max_new, json_answer
from app.openai.chat_template import render_chat
from app.openai.logprobs import Scored, chat_logprobs, scored
from app.openai.protocol import ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut
from app.openai.serving import Row, check, chunk_head, extensions, response_fields, stream_rows, submit_rows
from app.sse import sse_response
from app.steering_lookup import resolve
from model import tokenizer


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request
) -> ChatCompletionResponse | StreamingResponse:
    """Queue every choice of the rendered chat; answer with the whole result, or stream it."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    n = check(body, request, cid)
    served = get_served(request, body.model)
    settings = request.app.state.settings
    prompt, turn_end = render_chat(settings.chat_template, body.messages)
    ids = tokenizer.encode(prompt)
    default = default_max_new(served, len(ids), settings.default_max_new_tokens)
    k = body.top_k_logprobs
    iv = resolve(body.intervention, request, served)
    rows = [Row(i, 0, ids, prompt, body.to_sampling_params(default, turn_end, i, iv)) for i in range(n)]
    size = check_answer_size(request, served, [(r.params, 0) for r in rows])
    handles = submit_rows(served, rows, {"max_new_tokens": body.max_tokens_param, "logprobs": "top_logprobs"})

    if not body.stream:
        results = await collect(request, handles)

        def build() -> ChatCompletionResponse:
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

        return await json_answer(build, size)

    head = chunk_head(cid, "chat.completion.chunk", created, served)

    def opening(row: Row) -> list[dict[str, Any]]:
        return [
            {"index": row.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ]

    def delta(row: Row, text: str, tokens: list[Scored], finish: str | None) -> dict[str, Any]:
        lp = None if k is None else chat_logprobs(tokens, k).model_dump()
        return {
            "index": row.index,
            "delta": {"content": text} if text else {},
            "logprobs": lp,
            "finish_reason": finish,
            **extensions(row, tokens),
        }

    return sse_response(stream_rows(rows, handles, head, body.include_usage, opening, delta))
