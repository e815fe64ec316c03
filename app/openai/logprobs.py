"""OpenAI's two logprobs shapes (completions and chat), from the engine's scored tokens, and the prompt's."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from app.openai.protocol import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs
from app.service import ServedModel
from model import tokenizer
from model.engine import TokenEvent
from model.scoring import prompt_logprobs as score_prompt
from model.transformer import Transformer


@dataclass
class Scored:
    """A token with its logprob and the top alternatives (None for a prompt's first token: nothing predicts it)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    trace: dict[str, Any] | None = None  # the per-token trace, when asked for


def scored(ev: TokenEvent) -> Scored:
    return Scored(ev.token_id, ev.logprob, ev.top_logprobs, ev.trace)


async def prompt_logprobs(served: ServedModel, ids: list[int], k: int) -> list[Scored]:
    """Each prompt token with its logprob and top k, from one forward run as an engine job."""

    def job(model: Transformer) -> Any:  # a generator, for Engine.run_job
        return score_prompt(model, ids, k)

    scores = await asyncio.wrap_future(served.engine.run_job(job))
    return [Scored(s.token_id, s.logprob, s.top) for s in scores]


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
        if t.logprob is not None:
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
                **top(t.token_id, t.logprob).model_dump(),  # type: ignore[arg-type]  # generated tokens have one
                top_logprobs=[top(i, lp) for i, lp in (t.top or [])[:k]],
            )
            for t in tokens
        ]
    )
