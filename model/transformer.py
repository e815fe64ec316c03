"""A pre-LayerNorm GPT-style Transformer whose blocks compute x = x + F(x).

The KV cache is caller-owned state passed into `forward`; the residual stream is
returned on request (TransformerLens names), never captured with global hooks.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig

Component = Literal["block", "attn", "mlp"]
log = logging.getLogger(__name__)

RESID_NAMES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


class KVCache:
    """Preallocated keys/values for `n_rows` sequences: (n_layer, rows, n_head, block_size, head_dim)."""

    def __init__(
        self,
        config: ModelConfig,
        n_rows: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> None:
        shape = (config.n_layer, n_rows, config.n_head, config.block_size, config.head_dim)
        self.k = k if k is not None else _zeros(shape, device, dtype)
        self.v = v if v is not None else _zeros(shape, device, dtype)

    @property
    def n_rows(self) -> int:
        """Number of sequence rows."""
        return self.k.shape[1]

    def rows(self, start: int, stop: int) -> KVCache:
        """A view over rows [start, stop): writes through it land in this cache."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        return view

    def copy_row(self, src: int, dst: int) -> None:
        """Copy one row's keys/values over another (used to keep live rows contiguous)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])


def _zeros(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Zeros; on CPU from calloc'd memory, whose pages cost resident memory only once written.

    A cache sized for max_batch_size x block_size is then paid for as sequences fill it, not at start.
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    n_bytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(n_bytes, dtype=np.uint8)).view(dtype).view(shape)


@dataclass
class Intervention:
    """Blocks whose F(x) is zeroed, so that component becomes the identity map."""

    ablate: dict[int, Component] = field(default_factory=dict)

    def skips(self, layer: int, part: Literal["attn", "mlp"]) -> bool:
        """Whether `part` of block `layer` is ablated."""
        what = self.ablate.get(layer)
        return what == "block" or what == part


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
            rows, positions = write_idx  # each (B, T)
            k_cache[rows, :, positions] = k  # cache (B, nh, S_max, hd) <- (B, T, nh, hd)
            v_cache[rows, :, positions] = v
            keys, values = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]  # (B, nh, S, hd) views
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

    def forward(self, x: torch.Tensor, **attn_kw: object) -> torch.Tensor:
        if self.residual:
            x = x + self.resid_dropout(self.attn(self.ln_1(x), **attn_kw))
            x = x + self.mlp(self.ln_2(x))
            return x
        x = self.resid_dropout(self.attn(self.ln_1(x), **attn_kw))  # plain stack: no shortcut
        return self.mlp(self.ln_2(x))

    def forward_traced(
        self, x: torch.Tensor, layer: int, intervention: Intervention | None, **attn_kw: object
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same maths as `forward`, returning every named point of the residual stream."""
        skip_attn = intervention is not None and intervention.skips(layer, "attn")
        skip_mlp = intervention is not None and intervention.skips(layer, "mlp")
        resid_pre = x
        if skip_attn:
            attn_out, resid_mid = torch.zeros_like(x), x  # the block part is the identity
            if attn_kw.get("k_cache") is not None:  # still fill the cache so later steps stay consistent
                self.attn(self.ln_1(x), **attn_kw)
        else:
            attn_out = self.resid_dropout(self.attn(self.ln_1(x), **attn_kw))  # (B, T, C)
            resid_mid = resid_pre + attn_out if self.residual else attn_out
        if skip_mlp:
            mlp_out, resid_post = torch.zeros_like(x), resid_mid
        else:
            mlp_out = self.mlp(self.ln_2(resid_mid))  # (B, T, C)
            resid_post = resid_mid + mlp_out if self.residual else mlp_out
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
        intervention: Intervention | None = None,
        last_only: bool = False,
        at: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run the model on `idx` (B, T).

        With `cache` (B rows) and `pos` (B,), row b's tokens sit at positions pos[b]..pos[b]+T-1 and
        attend to everything that row has cached before them. `last_only` returns logits for the
        final position only (decode); `at` (B,) returns logits and residual stream at one index of
        each row only, as (B, 1, ...) (the last real token of right-padded prompts).
        """
        B, T = idx.shape
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
        for layer, block in enumerate(self.blocks):
            if cache is not None:
                attn_kw["k_cache"], attn_kw["v_cache"] = cache.k[layer], cache.v[layer]
            if return_resid or intervention is not None:
                x, trace = block.forward_traced(x, layer, intervention, **attn_kw)
                traces.append(trace if at is None else {k: _take(v, at) for k, v in trace.items()})
            else:
                x = block(x, **attn_kw)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        elif at is not None:
            x = _take(x, at)  # (B, 1, C)
        final = self.ln_f(x)  # (B, T, C)
        logits = self.unembed(final)  # (B, T, vocab)
        if return_resid:
            return ModelOutput(logits=logits, resid=traces, final=final)
        return ModelOutput(logits=logits)


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


class FastDecoder:
    """One-token decode steps for inference, with the weights laid out for it.

    Same maths as `Transformer.forward(tokens[:, None], cache=..., pos=..., last_only=True)` in far
    fewer tensor ops: contiguous (in, out) weight matrices for `addmm`, one flat `index_copy_` per
    cache write and attention as two `bmm`s. The step body (`_decode_step`) is compiled with
    TorchScript, so a whole step runs in C++ without taking the GIL between ops: an eager step hands
    the GIL over ~1,500 times, and every handover waits for whatever Python the server's event loop
    is running (`python -m bench.run --sections gil` times both next to a busy thread).
    If scripting is unavailable the same function runs eagerly.

    The decoder shares the model's weights rather than copying them: it re-lays each `nn.Linear`
    weight out in place as the transpose of a contiguous (in, out) matrix (same values; `F.linear`
    then multiplies by that matrix directly, so `forward` gets the layout too). In-place changes to the
    weights are seen by both; after replacing parameters (e.g. `model.to(...)`), build a new decoder.
    With `weights="float16"` (CPU with FBGEMM only, see `float16_weights_available`) the four matrices
    of each block are also packed as float16 for FBGEMM's fp16-weight GEMM: the arithmetic stays float32,
    the weights read per token halve, and the logits move by ~1e-4 relative (the weights are rounded).
    No dropout, residual stream or interventions here: those go through `forward`.
    """

    def __init__(self, model: Transformer, *, script: bool = True, weights: str = "float32") -> None:
        self.config = cfg = model.config
        if weights not in ("float32", "float16"):
            raise ValueError(f"weights must be 'float32' or 'float16', not {weights!r}")
        self.weights = weights
        if self.packed and not float16_weights_available(model.wte.weight.device):
            raise ValueError("float16 decode weights need a CPU build of torch with FBGEMM (x86)")

        def vec(t: torch.Tensor | None, n: int) -> torch.Tensor:
            return t.detach() if t is not None else model.wte.weight.new_zeros(n)  # a missing bias adds nothing

        def t(linear: nn.Linear) -> torch.Tensor:
            w = linear.weight
            if self.packed:
                return torch.fbgemm_pack_gemm_matrix_fp16(w.detach().float())  # (out, in) packed by FBGEMM
            if not w.t().is_contiguous():  # re-lay the model's weight out as the transpose of an (in, out) matrix
                w.data = w.detach().t().contiguous().t()
            return w.detach().t()  # (in, out), contiguous, the model's own storage

        self.wte, self.wpe = model.wte.weight.detach(), model.wpe.weight.detach()
        self.unembed_t = self.wte.t().contiguous()  # (C, vocab)
        C = cfg.d_model
        self.ln_f = [model.ln_f.weight.detach(), vec(model.ln_f.bias, C)]
        self.layers = [
            [
                b.ln_1.weight.detach(), vec(b.ln_1.bias, C), t(b.attn.c_attn), vec(b.attn.c_attn.bias, 3 * C),
                t(b.attn.c_proj), vec(b.attn.c_proj.bias, C),
                b.ln_2.weight.detach(), vec(b.ln_2.bias, C), t(b.mlp.c_fc), vec(b.mlp.c_fc.bias, cfg.d_ff),
                t(b.mlp.c_proj), vec(b.mlp.c_proj.bias, C),
            ]
            for b in model.blocks
        ]
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.scripted = False
        self._step = _decode_step
        if script:
            self._step, self.scripted = _scripted_decode_step()

    @property
    def packed(self) -> bool:
        """Whether the block matrices are FBGEMM-packed float16."""
        return self.weights == "float16"

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) for one new token per row: `tokens` (B,) at positions `pos` (B,)."""
        B = tokens.shape[0]
        cfg = self.config
        if tokens.shape != (B,) or pos.shape != (B,) or cache.n_rows != B:
            raise ValueError("a decode step needs tokens and pos of shape (B,) and a cache with B rows")
        if not cache.k[0].is_contiguous() or not cache.v[0].is_contiguous():
            raise ValueError("a decode step needs each layer of the cache to be contiguous")
        n_keys = int(pos.max()) + 1
        if n_keys > cfg.block_size:
            raise ValueError(f"position {n_keys - 1} exceeds block_size {cfg.block_size}")
        return self._step(tokens, pos, n_keys, cache.k, cache.v, self.wte, self.wpe, self.unembed_t, self.ln_f,
                          self.layers, cfg.n_head, self.scale, cfg.residual, self.packed)


def float16_weights_available(device: torch.device | str = "cpu") -> bool:
    """Whether `FastDecoder(weights="float16")` can run on `device` (a CPU build of torch with FBGEMM)."""
    return torch.device(device).type == "cpu" and _fbgemm_fp16_works()


@functools.cache
def _fbgemm_fp16_works() -> bool:
    """Probe FBGEMM's fp16-weight GEMM once per process."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    # Both ops are deprecated upstream and warn once per process: this probe takes those warnings, and
    # answers False if a later torch drops them (torch is pinned; decode then falls back to float32).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            w = torch.fbgemm_pack_gemm_matrix_fp16(torch.eye(8))
            ok = torch.equal(torch.fbgemm_linear_fp16_weight(torch.eye(8), w, torch.zeros(8)), torch.eye(8))
    except (AttributeError, RuntimeError):
        return False
    return ok


def auto_decode_weights(device: torch.device | str = "cpu") -> str:
    """What decode weights `auto` means: float16 where FBGEMM runs them (same val loss), else float32."""
    return "float16" if float16_weights_available(device) else "float32"


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, packed: bool) -> torch.Tensor:
    """x @ W^T + b, with W as a contiguous (in, out) float matrix or packed by FBGEMM as float16."""
    if packed:
        return torch.fbgemm_linear_fp16_weight(x, w, b)
    return torch.addmm(b, x, w)


def _decode_step(
    tokens: torch.Tensor, pos: torch.Tensor, n_keys: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
    wte: torch.Tensor, wpe: torch.Tensor, unembed_t: torch.Tensor, ln_f: list[torch.Tensor],
    layers: list[list[torch.Tensor]], n_head: int, scale: float, residual: bool, packed: bool,
) -> torch.Tensor:
    """The body of `FastDecoder.__call__` (checked input; n_keys = max(pos) + 1), in the TorchScript subset."""
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


@functools.cache
def _scripted_decode_step() -> tuple[Callable[..., torch.Tensor], bool]:
    """`_decode_step` compiled by TorchScript (once per process), or the plain function if that fails."""
    try:
        with warnings.catch_warnings():  # deprecated, but the only GIL-free step that needs no C++ compiler
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_decode_step), True
    except Exception as e:  # noqa: BLE001 - e.g. no source files, or a torch without TorchScript
        log.warning("TorchScript unavailable (%s: %s); the decode step runs eagerly", type(e).__name__, e)
        return _decode_step, False

