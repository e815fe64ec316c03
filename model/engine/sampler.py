"""Logits to tokens for a batch: logit controls, greedy or seeded sampling per row, and the model's logprobs."""

from __future__ import annotations

from typing import NamedTuple

import torch

from model.engine.batch import BatchPlan
from model.sampling import adjust_logits, record_tokens, sample_rows, top_logprobs


class Sampled(NamedTuple):
    """The batch's chosen tokens, and their logprobs when a row asked for them."""

    tokens: list[int]  # (B,)
    # (chosen (B,), top values (B, n), top ids (B, n)) as lists, under the model's own (raw) distribution
    logprobs: tuple[list[float], list[list[float]], list[list[int]]] | None


def sample(logits: torch.Tensor, plan: BatchPlan, dest: torch.Tensor) -> Sampled:
    """Pick each row's next token from `logits` (B, V) into `dest` (B,) (the rows' slots of the next tokens fed to
    the step). Logit bias and penalties change what is picked; logprobs stay the model's."""
    controls = plan.controls
    adjusted = adjust_logits(logits, controls) if controls is not None else logits
    s = plan.sampling
    if s is None:  # all greedy: nothing to draw
        chosen = torch.argmax(adjusted, dim=-1, out=dest)  # (B,)
    else:
        chosen = dest.copy_(sample_rows(adjusted, s.temperature, s.top_k, s.top_p, s.generators, s.min_p))  # (B,)
    tokens = chosen.tolist()
    if controls is not None:
        record_tokens(controls, tokens)
    if plan.n_logprobs == 0:
        return Sampled(tokens, None)
    lp, top_v, top_i = top_logprobs(logits, chosen, plan.n_logprobs)
    return Sampled(tokens, (lp.tolist(), top_v.tolist(), top_i.tolist()))
