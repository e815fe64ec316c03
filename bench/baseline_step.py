"""The decode step as it was before per-row interventions and traces (git 0959a3f, model/transformer.py: the step
body and `FastDecoder.__call__`), verbatim but for where its weights come from: the `interventions` bench section
times it next to today's step to show what interventions and the trace cost when no row uses them. Not used by the
server."""

import torch
import torch.nn.functional as F

from model.decode import DecodeWeights, FastDecoder, _linear
from model.kv_cache import KVCache


def baseline_step(
    tokens: torch.Tensor,
    pos: torch.Tensor,
    n_keys: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    unembed_t: torch.Tensor,
    ln_f: list[torch.Tensor],
    layers: list[list[torch.Tensor]],
    n_head: int,
    scale: float,
    residual: bool,
    packed: bool,
) -> torch.Tensor:
    """The old step body (checked input; n_keys = max(pos) + 1), in the TorchScript subset."""
    B, C, S = tokens.shape[0], wte.shape[1], k_cache.shape[3]
    nh, hd = n_head, C // n_head
    rows = torch.arange(B, device=pos.device)
    slot = ((rows[:, None] * nh + torch.arange(nh, device=pos.device)) * S + pos[:, None]).view(-1)  # (B*nh,)
    if int(pos.min()) == n_keys - 1:  # every row at the same position (always at batch 1): nothing to mask
        mask = torch.zeros((1, 1, 1), dtype=wte.dtype, device=pos.device)
    else:
        allowed = torch.arange(n_keys, device=pos.device) <= pos[:, None]  # (B, S')
        mask = torch.zeros((B, nh, 1, n_keys), dtype=wte.dtype, device=pos.device)
        mask = mask.masked_fill_(~allowed[:, None, None, :], float("-inf")).view(B * nh, 1, n_keys)
    x = wte.index_select(0, tokens) + wpe.index_select(0, pos)  # (B, C)
    for layer, w in enumerate(layers):
        ln_1_w, ln_1_b, w_qkv, b_qkv, w_o, b_o, ln_2_w, ln_2_b, w_fc, b_fc, w_p, b_p = w
        h = F.layer_norm(x, [C], ln_1_w, ln_1_b)  # (B, C)
        qkv = _linear(h, w_qkv, b_qkv, packed).view(B, 3, nh, hd)  # (B, 3, nh, hd)
        k_flat, v_flat = k_cache[layer].view(-1, hd), v_cache[layer].view(-1, hd)  # (B*nh*S, hd)
        k_flat.index_copy_(0, slot, qkv[:, 1].reshape(B * nh, hd))  # cache[b, h, pos[b]] = k[b, h]
        v_flat.index_copy_(0, slot, qkv[:, 2].reshape(B * nh, hd))
        keys = k_flat.view(B * nh, S, hd)[:, :n_keys]  # (B*nh, S', hd)
        values = v_flat.view(B * nh, S, hd)[:, :n_keys]
        q = qkv[:, 0].reshape(B * nh, 1, hd)
        att = torch.baddbmm(mask, q, keys.transpose(1, 2), alpha=scale).softmax(-1)  # (B*nh, 1, S')
        y = torch.bmm(att, values).view(B, C)  # (B, C)
        a = _linear(y, w_o, b_o, packed)  # (B, C)
        x = x + a if residual else a
        h = F.layer_norm(x, [C], ln_2_w, ln_2_b)
        m = _linear(F.gelu(_linear(h, w_fc, b_fc, packed), approximate="tanh"), w_p, b_p, packed)  # (B, C)
        x = x + m if residual else m
    return torch.mm(F.layer_norm(x, [C], ln_f[0], ln_f[1]), unembed_t)  # (B, vocab)


def baseline_args(w: DecodeWeights) -> tuple:
    """Today's packed weights as the old step took them: (wte, wpe, unembed_t, ln_f, layers)."""
    return w.wte, w.wpe, w.unembed_t, [w.ln_f_w, w.ln_f_b], [list(lw) for lw in w.layers]


class BaselineDecoder:
    """The old `FastDecoder.__call__` (its checks, then the scripted step) over today's packed weights."""

    def __init__(self, fast: FastDecoder) -> None:
        self.config, self.scale, self.packed = fast.config, fast.scale, fast.packed
        self.args = baseline_args(fast.w)
        self._step = torch.jit.script(baseline_step)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        cfg = self.config
        if tokens.shape != (B,) or pos.shape != (B,) or cache.n_rows != B:
            raise ValueError("a decode step needs tokens and pos of shape (B,) and a cache with B rows")
        if not cache.k[0].is_contiguous() or not cache.v[0].is_contiguous():
            raise ValueError("a decode step needs each layer of the cache to be contiguous")
        n_keys = int(pos.max()) + 1
        if n_keys > cfg.block_size:
            raise ValueError(f"position {n_keys - 1} exceeds block_size {cfg.block_size}")
        return self._step(
            tokens, pos, n_keys, cache.k, cache.v, *self.args, cfg.n_head, self.scale, cfg.residual, self.packed
        )
