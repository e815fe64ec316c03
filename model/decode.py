"""The serving fast path: a one-token decode step for a batch of rows, compiled with TorchScript.

`model/transformer.py` is the readable reference; `FastDecoder` computes the same maths (tested equal to
it) in far fewer tensor ops, with each row's stream edits (`model.edits.StreamEdits`, applied by
`model.edits.apply`) and, for the rows that ask, the residual stream after every layer (the per-token trace).

No `from __future__ import annotations` here: TorchScript reads the NamedTuples' annotations as types.
"""

import functools
import logging
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.edits import StreamEdits, apply
from model.kv_cache import KVCache

if TYPE_CHECKING:
    from model.transformer import Transformer

log = logging.getLogger(__name__)


class LayerWeights(NamedTuple):
    """One block's tensors as the step reads them: matrices (in, out) or FBGEMM-packed, biases never None."""

    ln_1_w: torch.Tensor
    ln_1_b: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_o: torch.Tensor
    b_o: torch.Tensor
    ln_2_w: torch.Tensor
    ln_2_b: torch.Tensor
    w_fc: torch.Tensor
    b_fc: torch.Tensor
    w_p: torch.Tensor
    b_p: torch.Tensor


class DecodeWeights(NamedTuple):
    """Every tensor of a decode step."""

    wte: torch.Tensor  # (vocab, C)
    wpe: torch.Tensor  # (block_size, C)
    unembed_t: torch.Tensor  # (C, vocab)
    ln_f_w: torch.Tensor
    ln_f_b: torch.Tensor
    layers: list[LayerWeights]


class StepOutput(NamedTuple):
    """A decode step's logits and, when rows were traced, their residual stream."""

    logits: torch.Tensor  # (B, vocab)
    stream: torch.Tensor | None  # (n_layer + 1, R, C): the embedding, then resid_post of every layer, traced rows


class FastDecoder:
    """One-token decode steps for inference, with the weights laid out for it.

    Same maths as `Transformer.forward(tokens[:, None], cache=..., pos=..., last_only=True, edits=...)` in
    far fewer tensor ops: contiguous (in, out) weight matrices for `addmm`, one flat `index_copy_` per cache
    write and attention as two `bmm`s. The step bodies (`_decode_step`, and `_edited_decode_step` for batches
    with an edited or traced row) are compiled with TorchScript, so a
    whole step runs in C++ without taking the GIL between ops: an eager step hands the GIL over ~1,500 times,
    and every handover waits for whatever Python the server's event loop is running
    (`python -m bench.run --sections gil` times both next to a busy thread). If scripting is unavailable the
    same function runs eagerly.

    The decoder shares the model's weights rather than copying them: it re-lays each `nn.Linear` weight out
    in place as the transpose of a contiguous (in, out) matrix (same values; `F.linear` then multiplies by
    that matrix directly, so `forward` gets the layout too). After replacing parameters (e.g.
    `model.to(...)`), build a new decoder. With `weights="float16"` (CPU with FBGEMM only, see
    `float16_weights_available`) the four matrices of each block are also packed as float16 for FBGEMM's
    fp16-weight GEMM: the arithmetic stays float32, the weights read per token halve, and the logits move by
    ~1e-4 relative (the weights are rounded). No dropout here.
    """

    def __init__(self, model: "Transformer", *, script: bool = True, weights: str = "float32") -> None:
        self.config = cfg = model.config
        if weights not in ("float32", "float16"):
            raise ValueError(f"weights must be 'float32' or 'float16', not {weights!r}")
        self.weights = weights
        if self.packed and not float16_weights_available(model.wte.weight.device):
            raise ValueError("float16 decode weights need a CPU build of torch with FBGEMM (x86)")
        self.w = _pack(model, self.packed)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self._steps = _scripted_steps() if script else _Steps(_decode_step, _edited_decode_step, False)
        self.scripted = self._steps.scripted

    @property
    def packed(self) -> bool:
        """Whether the block matrices are FBGEMM-packed float16."""
        return self.weights == "float16"

    @torch.inference_mode()
    def __call__(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        pos: torch.Tensor,
        edits: StreamEdits | None = None,
        trace_rows: torch.Tensor | None = None,
    ) -> StepOutput:
        """Logits (B, vocab) for one new token per row: `tokens` (B,) at positions `pos` (B,).

        `edits` (B rows) change what each block writes per row; `trace_rows` (R,) picks the rows whose residual
        stream is returned.
        """
        cfg = self.config
        check_step_shapes(cfg, tokens, cache, pos, edits)
        if not cache.k[0].is_contiguous() or not cache.v[0].is_contiguous():
            raise ValueError("a decode step needs each layer of the cache to be contiguous")
        if cache.k.dtype != self.w.wpe.dtype:
            raise ValueError(f"the TorchScript step needs a {self.w.wpe.dtype} cache, not {cache.k.dtype}")
        n_keys = int(pos.max()) + 1
        if n_keys > cfg.block_size:
            raise ValueError(f"position {n_keys - 1} exceeds block_size {cfg.block_size}")
        args = (tokens, pos, n_keys, cache.k, cache.v, self.w, cfg.n_head, self.scale, cfg.residual, self.packed)
        if edits is None and trace_rows is None:  # no row pays for what none uses
            return StepOutput(self._steps.plain(*args), None)
        return StepOutput(*self._steps.edited(*args, edits, trace_rows))


def check_step_shapes(
    config: ModelConfig, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor, edits: StreamEdits | None
) -> None:
    """The shapes every decode step needs: tokens and pos (B,), a cache of B rows, edits of B rows or None."""
    B = tokens.shape[0]
    if tokens.shape != (B,) or pos.shape != (B,) or cache.n_rows != B:
        raise ValueError("a decode step needs tokens and pos of shape (B,) and a cache with B rows")
    if edits is not None:
        edits.check(B, config.n_layer, config.d_model)


def _pack(model: "Transformer", packed: bool) -> DecodeWeights:
    """The model's tensors laid out for the step (sharing the model's storage unless packed as float16)."""
    C, cfg = model.config.d_model, model.config

    def vec(t: torch.Tensor | None, n: int) -> torch.Tensor:
        return t.detach() if t is not None else model.wte.weight.new_zeros(n)  # a missing bias adds nothing

    def mat(linear: nn.Linear) -> torch.Tensor:
        w = linear.weight
        if packed:
            return torch.fbgemm_pack_gemm_matrix_fp16(w.detach().float())  # (out, in) packed by FBGEMM
        if not w.t().is_contiguous():  # re-lay the model's weight out as the transpose of an (in, out) matrix
            w.data = w.detach().t().contiguous().t()
        return w.detach().t()  # (in, out), contiguous, the model's own storage

    layers = [
        LayerWeights(
            b.ln_1.weight.detach(),
            vec(b.ln_1.bias, C),
            mat(b.attn.c_attn),
            vec(b.attn.c_attn.bias, 3 * C),
            mat(b.attn.c_proj),
            vec(b.attn.c_proj.bias, C),
            b.ln_2.weight.detach(),
            vec(b.ln_2.bias, C),
            mat(b.mlp.c_fc),
            vec(b.mlp.c_fc.bias, cfg.d_ff),
            mat(b.mlp.c_proj),
            vec(b.mlp.c_proj.bias, C),
        )
        for b in model.layers
    ]
    wte = model.wte.weight.detach()
    return DecodeWeights(
        wte,
        model.wpe.weight.detach(),
        wte.t().contiguous(),
        model.ln_f.weight.detach(),
        vec(model.ln_f.bias, C),
        layers,
    )


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


FLOAT16_MAX = torch.finfo(torch.float16).max


def float16_overflow(model: nn.Module) -> tuple[str, float] | None:
    """The first parameter holding a value beyond float16's range (as float16 it would be inf, and the step's numbers
    NaN), with its largest |value|; None when every weight fits."""
    for name, p in model.named_parameters():
        top = float(p.detach().abs().max()) if p.numel() else 0.0
        if top > FLOAT16_MAX:
            return name, top
    return None


def auto_decode_weights(device: torch.device | str = "cpu", model: nn.Module | None = None) -> str:
    """What decode weights `auto` means: float16 where FBGEMM runs them (same val loss), else float32; float32 too,
    with a warning, for a `model` whose weights float16 cannot hold."""
    if not float16_weights_available(device):
        return "float32"
    over = float16_overflow(model) if model is not None else None
    if over is not None:
        log.warning(
            "decode weights: float32, not float16: %s holds %.3g, beyond float16's range (%.0f)", *over, FLOAT16_MAX
        )
        return "float32"
    return "float16"


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, packed: bool) -> torch.Tensor:
    """x @ W^T + b, with W as a contiguous (in, out) float matrix or packed by FBGEMM as float16."""
    if packed:
        return torch.fbgemm_linear_fp16_weight(x, w, b)
    return torch.addmm(b, x, w)


def _embed(
    tokens: torch.Tensor, pos: torch.Tensor, n_keys: int, S: int, w: DecodeWeights, nh: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (B, C), the flat cache slot of each (row, head) (B*nh,), the additive attention mask) of a step."""
    B = tokens.shape[0]
    rows = torch.arange(B, device=pos.device)
    slot = ((rows[:, None] * nh + torch.arange(nh, device=pos.device)) * S + pos[:, None]).view(-1)  # (B*nh,)
    if int(pos.min()) == n_keys - 1:  # every row at the same position (always at batch 1): nothing to mask
        mask = torch.zeros((1, 1, 1), dtype=w.wte.dtype, device=pos.device)
    else:
        allowed = torch.arange(n_keys, device=pos.device) <= pos[:, None]  # (B, S')
        mask = torch.zeros((B, nh, 1, n_keys), dtype=w.wte.dtype, device=pos.device)
        mask = mask.masked_fill_(~allowed[:, None, None, :], float("-inf")).view(B * nh, 1, n_keys)
    x = w.wte.index_select(0, tokens) + w.wpe.index_select(0, pos)  # (B, C)
    return x, slot, mask


def _attention(
    x: torch.Tensor,
    lw: LayerWeights,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    mask: torch.Tensor,
    n_keys: int,
    nh: int,
    scale: float,
    packed: bool,
) -> torch.Tensor:
    """The attention part's F(x) (B, C) for one new token per row; writes its keys/values into one layer's cache."""
    B, C, S = x.shape[0], x.shape[1], k_cache.shape[2]
    hd = C // nh
    h = F.layer_norm(x, [C], lw.ln_1_w, lw.ln_1_b)  # (B, C)
    qkv = _linear(h, lw.w_qkv, lw.b_qkv, packed).view(B, 3, nh, hd)  # (B, 3, nh, hd)
    k_flat, v_flat = k_cache.view(-1, hd), v_cache.view(-1, hd)  # (B*nh*S, hd)
    k_flat.index_copy_(0, slot, qkv[:, 1].reshape(B * nh, hd))  # cache[b, h, pos[b]] = k[b, h]
    v_flat.index_copy_(0, slot, qkv[:, 2].reshape(B * nh, hd))
    keys = k_flat.view(B * nh, S, hd)[:, :n_keys]  # (B*nh, S', hd)
    values = v_flat.view(B * nh, S, hd)[:, :n_keys]
    q = qkv[:, 0].reshape(B * nh, 1, hd)
    att = torch.baddbmm(mask, q, keys.transpose(1, 2), alpha=scale).softmax(-1)  # (B*nh, 1, S')
    y = torch.bmm(att, values).view(B, C)  # (B, C)
    return _linear(y, lw.w_o, lw.b_o, packed)  # (B, C)


def _mlp(x: torch.Tensor, lw: LayerWeights, packed: bool) -> torch.Tensor:
    """The MLP part's F(x) (B, C)."""
    h = F.layer_norm(x, [x.shape[1]], lw.ln_2_w, lw.ln_2_b)  # (B, C)
    return _linear(F.gelu(_linear(h, lw.w_fc, lw.b_fc, packed), approximate="tanh"), lw.w_p, lw.b_p, packed)


def _decode_step(
    tokens: torch.Tensor,
    pos: torch.Tensor,
    n_keys: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    w: DecodeWeights,
    n_head: int,
    scale: float,
    residual: bool,
    packed: bool,
) -> torch.Tensor:
    """One step of every row, nothing changed or traced (the common case): logits (B, vocab)."""
    x, slot, mask = _embed(tokens, pos, n_keys, k_cache.shape[3], w, n_head)
    for layer, lw in enumerate(w.layers):
        a = _attention(x, lw, k_cache[layer], v_cache[layer], slot, mask, n_keys, n_head, scale, packed)
        x = x + a if residual else a
        m = _mlp(x, lw, packed)
        x = x + m if residual else m
    return torch.mm(F.layer_norm(x, [x.shape[1]], w.ln_f_w, w.ln_f_b), w.unembed_t)  # (B, vocab)


def _edited_decode_step(
    tokens: torch.Tensor,
    pos: torch.Tensor,
    n_keys: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    w: DecodeWeights,
    n_head: int,
    scale: float,
    residual: bool,
    packed: bool,
    edits: Optional[StreamEdits],  # noqa: UP045 - TorchScript
    trace_rows: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_decode_step` with each row's stream edits and the stream of the `trace_rows`."""
    x, slot, mask = _embed(tokens, pos, n_keys, k_cache.shape[3], w, n_head)
    stream: list[torch.Tensor] = []
    if trace_rows is not None:
        stream.append(x.index_select(0, trace_rows))  # (R, C)
    for layer, lw in enumerate(w.layers):
        a = _attention(x, lw, k_cache[layer], v_cache[layer], slot, mask, n_keys, n_head, scale, packed)
        x = apply(edits, layer, 0, x, a, residual, pos)[1]  # (B, C); part 0: ATTN_PART (TorchScript reads no globals)
        x = apply(edits, layer, 1, x, _mlp(x, lw, packed), residual, pos)[1]  # MLP_PART
        if trace_rows is not None:
            stream.append(x.index_select(0, trace_rows))  # (R, C)
    logits = torch.mm(F.layer_norm(x, [x.shape[1]], w.ln_f_w, w.ln_f_b), w.unembed_t)  # (B, vocab)
    if trace_rows is None:
        return logits, None
    return logits, torch.stack(stream)  # (L + 1, R, C)


class _Steps(NamedTuple):
    plain: Callable[..., torch.Tensor]
    edited: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    scripted: bool


@functools.cache
def _scripted_steps() -> _Steps:
    """Both step bodies compiled by TorchScript (once per process), or the plain functions if that fails."""
    try:
        with warnings.catch_warnings():  # deprecated, but the only GIL-free step that needs no C++ compiler
            warnings.simplefilter("ignore", DeprecationWarning)
            return _Steps(torch.jit.script(_decode_step), torch.jit.script(_edited_decode_step), True)
    except Exception as e:  # noqa: BLE001 - e.g. no source files, or a torch without TorchScript
        log.warning("TorchScript unavailable (%s: %s); the decode step runs eagerly", type(e).__name__, e)
        return _Steps(_decode_step, _edited_decode_step, False)
