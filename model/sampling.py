"""Pure, seeded sampling: each row draws its randomness from its own torch.Generator."""

from __future__ import annotations

import torch


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V).

    temperature (B,) with 0 meaning greedy; top_k (B,) with 0 meaning off; top_p (B,) in (0, 1].
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
