"""Pure, seeded sampling: each row draws its randomness from its own torch.Generator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V).

    temperature (B,) with 0 meaning greedy; top_k (B,) with 0 meaning off; top_p (B,) in (0, 1]; min_p (B,) in [0, 1]
    with 0 meaning off, applied after temperature and before top-k/top-p (vLLM's order).
    A row's draw uses exactly one uniform from its own generator, so its tokens never depend on
    what else is in the batch. Rows with temperature 0 take the argmax and draw nothing.
    """
    B, V = logits.shape
    greedy = logits.argmax(dim=-1)  # (B,)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return greedy
    idx = sampled.nonzero().squeeze(1)  # (S,)
    lg = logits[idx]
    lg = (lg - lg.amax(dim=-1, keepdim=True)) / temperature[idx, None]  # (S, V); shifted so a tiny T cannot overflow
    if min_p is not None and bool((min_p[idx] > 0).any()):
        lg = min_p_filter(lg, min_p[idx])
    sorted_lg, order = lg.sort(dim=-1, descending=True)  # (S, V)
    rank = torch.arange(V, device=logits.device)  # (V,)
    k = torch.where(top_k[idx] > 0, top_k[idx], V)  # (S,)
    keep = rank[None, :] < k[:, None]  # (S, V)
    probs = torch.softmax(sorted_lg.masked_fill(~keep, float("-inf")), dim=-1)  # (S, V)
    # nucleus: keep the smallest prefix whose mass reaches top_p (always at least one token)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    keep &= (before < top_p[idx, None]) | (rank[None, :] == 0)  # the best token always stays (top_p may round to 0)
    probs = probs.masked_fill(~keep, 0.0)
    cdf = probs.cumsum(dim=-1)  # (S, V)
    u = torch.stack([torch.rand((), generator=generators[int(i)]) for i in idx.tolist()]).to(logits.device)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=V - 1)  # (S, 1)
    # searchsorted can land on a zeroed tail entry only through rounding; step back to the last kept token
    n_kept = keep.sum(dim=-1, keepdim=True)  # (S, 1)
    choice = torch.minimum(choice, n_kept - 1)
    out = greedy.clone()
    out[idx] = order.gather(1, choice).squeeze(1)
    return out


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities (under the model's distribution) of the chosen tokens and the top-n alternatives.

    Returns (chosen (B,), top_values (B, n), top_ids (B, n)).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)  # (B,)
    values, ids = logp.topk(max(n, 1), dim=-1)  # (B, n)
    return chosen, values[:, :n], ids[:, :n]


# ---- logit controls: logit_bias, penalties, min_p (the order is vLLM's: bias, penalties, temperature, min_p) ----

MAX_BIAS = 100.0  # OpenAI's range for logit_bias values; larger values are clamped, as vLLM does


@dataclass
class LogitControls:
    """Per-request state of the logit controls, made by `LogitControls.create` (None when a request uses none).

    `counts` (V,) counts the tokens this request generated; `in_prompt` (V,) marks the prompt's tokens (repetition
    penalty only); `bias` (V,) is the additive logit bias (None without one).
    """

    presence: float
    frequency: float
    repetition: float
    counts: torch.Tensor
    in_prompt: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def create(
        cls,
        prompt: list[int],
        params: Any,
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> LogitControls | None:
        """The state for a request with `params` (a SamplingParams), or None when it asks for no control."""
        pres, freq, rep = params.presence_penalty, params.frequency_penalty, params.repetition_penalty
        if pres == 0 and freq == 0 and rep == 1 and not params.logit_bias:
            return None
        bias = None
        if params.logit_bias:
            bias = torch.zeros(vocab_size, device=device)
            ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=device)
            values = torch.tensor([b for _, b in params.logit_bias], device=device)
            bias[ids] = values.clamp(-MAX_BIAS, MAX_BIAS)
        in_prompt = None
        if rep != 1:
            in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            in_prompt[torch.tensor(prompt, dtype=torch.long, device=device)] = True
        return cls(pres, freq, rep, torch.zeros(vocab_size, device=device), in_prompt, bias)


def control_problem(params: Any, vocab_size: int) -> tuple[str, str] | None:
    """(message, field) for the first out-of-range logit control of `params` (a SamplingParams), else None."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(params, name)
        if not -2.0 <= v <= 2.0:
            return f"{name} must be in -2..2", name
    if not (0 < params.repetition_penalty < math.inf):
        return "repetition_penalty must be a finite number > 0 (1 = off)", "repetition_penalty"
    if not 0.0 <= params.min_p <= 1.0:
        return "min_p must be in 0..1 (0 = off)", "min_p"
    for tok, b in params.logit_bias:
        if not 0 <= tok < vocab_size:
            return f"logit_bias token ids must be in 0..{vocab_size - 1}", "logit_bias"
        if not math.isfinite(b):
            return "logit_bias values must be finite numbers", "logit_bias"
    return None


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logits (B, V) + bias (B, V) (rows without a bias hold zeros)."""
    return logits + bias


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
    seen: torch.Tensor,
) -> torch.Tensor:
    """The penalties of logits (B, V), per row.

    counts (B, V): how often each token was generated so far; presence, frequency (B,): OpenAI's definition,
    `logit - frequency * count - presence * (count > 0)` over generated tokens; repetition (B,) with 1 = off: the
    CTRL / Hugging Face definition over the tokens in `seen` (B, V) (prompt or generated): a positive logit is
    divided by it, a negative one multiplied.
    """
    penalized = torch.where(logits > 0, logits / repetition[:, None], logits * repetition[:, None])
    logits = torch.where(seen, penalized, logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def adjust_logits(logits: torch.Tensor, controls: list[LogitControls | None]) -> torch.Tensor:
    """logits (B, V) with each row's bias and penalties applied (in vLLM's order); unchanged if no row has any."""
    if all(c is None for c in controls):
        return logits
    B, V = logits.shape
    logits = logits.float()
    zeros = torch.zeros(V, device=logits.device)
    bias = [c.bias for c in controls if c is not None and c.bias is not None]
    if bias:
        logits = apply_logit_bias(
            logits, torch.stack([c.bias if c is not None and c.bias is not None else zeros for c in controls])
        )
    no_prompt = torch.zeros(V, dtype=torch.bool, device=logits.device)
    counts = torch.stack([c.counts if c is not None else zeros for c in controls])  # (B, V)
    seen = torch.stack([c.in_prompt if c is not None and c.in_prompt is not None else no_prompt for c in controls]) | (
        counts > 0
    )
    presence, frequency, repetition = (
        torch.tensor([getattr(c, name) if c is not None else default for c in controls], device=logits.device)
        for name, default in (("presence", 0.0), ("frequency", 0.0), ("repetition", 1.0))
    )
    return apply_penalties(logits, counts, presence, frequency, repetition, seen)


def record_tokens(controls: list[LogitControls | None], tokens: list[int]) -> None:
    """Count each row's newly generated token."""
    for c, t in zip(controls, tokens, strict=True):
        if c is not None:
            c.counts[t] += 1


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop (to -inf) the tokens of logits (B, V) whose probability is below min_p (B,) times the row's best."""
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, float("-inf"))
