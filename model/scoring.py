"""Scoring a given text: each token's logprob under the model, with the top alternatives (no generation)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from model.transformer import Transformer, in_slices


@dataclass(frozen=True, slots=True)
class TokenScore:
    """A token with its logprob and the top alternatives (None for the first token: nothing predicts it)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


def prompt_logprobs(model: Transformer, ids: list[int], k: int) -> Generator[None, None, list[TokenScore]]:
    """One forward over `ids`; each token after the first with its logprob and its top `k` (at least 1)
    alternatives. A generator for `Engine.run_job`: it yields after each block of the forward
    (`Transformer.forward_steps`), then computes the softmax."""
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    res = yield from in_slices(model.forward_steps(idx), torch.no_grad)
    with torch.no_grad():
        logits = res.logits[0, :-1].float()  # (T-1, V): position t predicts token t+1
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, idx[0, 1:, None]).squeeze(1).tolist()
    values, top_ids = logp.topk(max(k, 1), dim=-1)
    out = [TokenScore(ids[0], None, None)]
    for t, lp, v, i in zip(ids[1:], chosen, values.tolist(), top_ids.tolist(), strict=True):
        out.append(TokenScore(t, lp, list(zip(i, v, strict=True))))
    return out
