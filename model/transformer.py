"""A pre-LayerNorm GPT-style Transformer whose blocks compute x = x + F(x).

The KV cache is caller-owned state passed into `forward`; the residual stream is
returned on request (TransformerLens names), never captured with global hooks.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.edits import ATTN_PART, MLP_PART, RESID_PRE, StreamEdits, StreamPatch, apply, replace
from model.kv_cache import KVCache

log = logging.getLogger(__name__)

R = TypeVar("R")
RESID_NAMES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


@dataclass
class ModelOutput:
    """Logits plus, when asked, the residual stream of every layer."""

    logits: torch.Tensor  # (B, T, vocab)
    resid: list[dict[str, torch.Tensor]] | None = None  # per layer: RESID_NAMES -> (B, T, d_model)
    final: torch.Tensor | None = None  # ln_f(resid_post[-1]): (B, T, d_model)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.attn_dropout = config.attn_dropout

    def forward(
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor | None = None,
        v_cache: torch.Tensor | None = None,
        write_idx: tuple[torch.Tensor, torch.Tensor] | None = None,
        n_keys: int = 0,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # each (B, T, nh, hd)
        q = q.transpose(1, 2)  # (B, nh, T, hd)
        if k_cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
            p = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, nh, T, hd)
        else:
            assert v_cache is not None and write_idx is not None, "a cached forward needs the cache and write_idx"
            rows, positions = write_idx  # each (B, T)
            # the cache may keep keys and values in a narrower dtype (float16): rounded once, when written
            k_cache[rows, :, positions] = k.to(k_cache.dtype)  # cache (B, nh, S_max, hd) <- (B, T, nh, hd)
            v_cache[rows, :, positions] = v.to(v_cache.dtype)
            keys, values = k_cache[:, :, :n_keys].to(q.dtype), v_cache[:, :, :n_keys].to(q.dtype)  # (B, nh, S, hd)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward network."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """One residual block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)
        self.residual = config.residual
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        edits: StreamEdits | None = None,
        layer: int = 0,
        pos: torch.Tensor | None = None,
        patch: StreamPatch | None = None,
        **attn_kw: object,
    ) -> torch.Tensor:
        """`edits` (B rows) change what this block, layer `layer` of the model, writes at positions `pos` (B, T);
        `patch` (B rows) replaces one activation per row (`model.edits.StreamPatch`)."""
        if edits is not None or patch is not None:
            return self.forward_traced(x, edits, layer, pos, patch, **attn_kw)[0]
        if self.residual:
            x = x + self.resid_dropout(self.attn(self.ln_1(x), **attn_kw))
            x = x + self.mlp(self.ln_2(x))
            return x
        x = self.resid_dropout(self.attn(self.ln_1(x), **attn_kw))  # plain stack: no shortcut
        return self.mlp(self.ln_2(x))

    def forward_traced(
        self,
        x: torch.Tensor,
        edits: StreamEdits | None = None,
        layer: int = 0,
        pos: torch.Tensor | None = None,
        patch: StreamPatch | None = None,
        **attn_kw: object,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same maths as `forward`, returning every named point of the residual stream.

        With edits, `attn_out`/`mlp_out` are what the part writes (e.g. factor x F(x)); a skipped part writes
        nothing and the stream passes it unchanged, in a plain stack too (`model.edits.apply`).
        """
        if pos is None:
            pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)  # (B, T)
        resid_pre = x = replace(patch, layer, RESID_PRE, x, pos)  # a patched input, before the block reads it
        attn_out = self.resid_dropout(self.attn(self.ln_1(x), **attn_kw))  # (B, T, C); fills the cache if skipped too
        attn_out, resid_mid = apply(edits, layer, ATTN_PART, resid_pre, attn_out, self.residual, pos, patch)
        mlp_out = self.mlp(self.ln_2(resid_mid))  # (B, T, C)
        mlp_out, resid_post = apply(edits, layer, MLP_PART, resid_mid, mlp_out, self.residual, pos, patch)
        trace = dict(
            resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid, mlp_out=mlp_out, resid_post=resid_post
        )
        return resid_post, trace


class Transformer(nn.Module):
    """Decoder-only language model over bytes with a deep residual stack."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the writes into the residual stream
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def layers(self) -> list[Block]:
        """The blocks, in order, as `Block`s (what `blocks` holds, typed)."""
        return cast(list[Block], list(self.blocks))

    def num_params(self) -> int:
        """Number of parameters (the unembedding is tied to the token embedding)."""
        return sum(p.numel() for p in self.parameters())

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised stream (..., d_model) to logits (..., vocab)."""
        return F.linear(x, self.wte.weight)

    def _cache_mask(self, positions: torch.Tensor, n_keys: int) -> tuple[torch.Tensor | None, bool]:
        """(additive mask (B, 1, T, S), is_causal) for a cached forward, built once for all layers.

        No mask is needed when every row sits at the same position: a one-token decode step attends to all
        cached keys, and a fresh prefill (T == S) is plain causal attention.
        """
        T = positions.shape[1]
        if bool((positions[:, -1] == n_keys - 1).all()):
            if T == 1:
                return None, False
            if T == n_keys:
                return None, True
        key_pos = torch.arange(n_keys, device=positions.device)  # (S,)
        allowed = key_pos[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, S)
        mask = torch.zeros(allowed.shape, dtype=self.wte.weight.dtype, device=positions.device)
        return mask.masked_fill_(~allowed, float("-inf")), False

    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        pos: torch.Tensor | None = None,
        return_resid: bool = False,
        edits: StreamEdits | None = None,
        last_only: bool = False,
        at: torch.Tensor | None = None,
        patch: StreamPatch | None = None,
    ) -> ModelOutput:
        """Run the model on `idx` (B, T).

        With `cache` (B rows) and `pos` (B,), row b's tokens sit at positions pos[b]..pos[b]+T-1 and
        attend to everything that row has cached before them. `last_only` returns logits for the
        final position only (decode); `at` (B,) returns logits and residual stream at one index of
        each row only, as (B, 1, ...) (the last real token of right-padded prompts). `edits`
        (`model.edits.StreamEdits`, B rows) change what each block writes per row; `patch`
        (`model.edits.StreamPatch`, B rows) replaces one activation per row (activation patching).
        `forward_steps` with the same arguments, run to its end: the one implementation of the forward.
        """
        steps = self.forward_steps(
            idx, cache=cache, pos=pos, return_resid=return_resid, edits=edits, last_only=last_only, at=at, patch=patch
        )
        return run_to_end(steps)

    def forward_steps(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        pos: torch.Tensor | None = None,
        return_resid: bool = False,
        edits: StreamEdits | None = None,
        last_only: bool = False,
        at: torch.Tensor | None = None,
        patch: StreamPatch | None = None,
    ) -> Generator[None, None, ModelOutput]:
        """`forward` (same arguments, same result) one block at a time: a generator that yields after each block
        (n_layer times) and returns the ModelOutput, for a job that time-shares the worker (`in_slices`).

        Each step runs in whatever grad/inference context its caller's `next()` runs in; nothing is kept on the
        module between steps, so other forwards may run in between."""
        B, T = idx.shape
        if patch is not None:
            patch.check(B, self.config.n_layer, self.config.d_model)
        if at is not None and (last_only or at.shape != (B,) or bool(((at < 0) | (at >= T)).any())):
            raise ValueError(f"`at` needs shape ({B},) with indices in 0..{T - 1}, and no last_only")
        attn_kw: dict[str, object] = {}
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            positions = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
        else:
            if pos is None or pos.shape != (B,) or cache.n_rows != B:
                raise ValueError("a cached forward needs pos of shape (B,) and a cache with B rows")
            positions = pos[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            n_keys = int(positions.max()) + 1
            if n_keys > self.config.block_size:
                raise ValueError(f"position {n_keys - 1} exceeds block_size {self.config.block_size}")
            rows = torch.arange(B, device=idx.device)[:, None].expand(B, T)  # (B, T)
            mask, causal = self._cache_mask(positions, n_keys)
            attn_kw = dict(write_idx=(rows, positions), n_keys=n_keys, mask=mask, causal=causal)
        x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, C)
        traces: list[dict[str, torch.Tensor]] = []
        for layer, block in enumerate(self.layers):
            if cache is not None:
                attn_kw["k_cache"], attn_kw["v_cache"] = cache.k[layer], cache.v[layer]
            if return_resid:
                x, trace = block.forward_traced(x, edits, layer, positions, patch, **attn_kw)
                traces.append(trace if at is None else {k: _take(v, at) for k, v in trace.items()})
            else:
                x = block(x, edits, layer, positions, patch, **attn_kw)
            yield
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        elif at is not None:
            x = _take(x, at)  # (B, 1, C)
        final = self.ln_f(x)  # (B, T, C)
        logits = self.unembed(final)  # (B, T, vocab)
        if return_resid:
            return ModelOutput(logits=logits, resid=traces, final=final)
        return ModelOutput(logits=logits)


def run_to_end(steps: Generator[None, None, R]) -> R:
    """Run a sliced computation (`forward_steps`, a job) to its end without stopping; what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return cast(R, stop.value)


def in_slices(
    steps: Generator[None, None, R], context: Callable[[], contextlib.AbstractContextManager[Any]]
) -> Generator[None, None, R]:
    """Run `steps` (e.g. `Transformer.forward_steps`) one step at a time, each inside a fresh `context()` (e.g.
    `torch.inference_mode`), yielding between steps: a job's slices, no grad/inference context held across a yield.
    Returns what `steps` returns; yields as often as `steps` does (the last slice: its last yield to its end)."""
    while True:
        with context():
            try:
                next(steps)
            except StopIteration as stop:
                return cast(R, stop.value)
        yield


def _take(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """x[b, at[b]] for every row b of x (B, T, C), as (B, 1, C)."""
    return x[torch.arange(x.shape[0], device=x.device), at][:, None]


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in `Transformer(config).state_dict()`, without building the model."""
    C, D = config.d_model, config.d_ff
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.block_size, C)}

    def add(name: str, weight: tuple[int, ...]) -> None:  # a LayerNorm or Linear: weight, then bias if any
        shapes[f"{name}.weight"] = weight
        if config.bias:
            shapes[f"{name}.bias"] = weight[:1]

    for layer in range(config.n_layer):
        p = f"blocks.{layer}."
        add(p + "ln_1", (C,))
        add(p + "attn.c_attn", (3 * C, C))
        add(p + "attn.c_proj", (C, C))
        add(p + "ln_2", (C,))
        add(p + "mlp.c_fc", (D, C))
        add(p + "mlp.c_proj", (C, D))
    add("ln_f", (C,))
    return shapes
