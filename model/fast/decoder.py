"""`FusedDecoder`: the decode step of `model.decode.FastDecoder` as one C call (`fused_step.c`, boundary
`fused_step.h`).

The weights are packed once, at construction, into two flat tensors (the block matrices, float16 or float32, and the
float32 vectors, layer after layer in `ShortcutLayerWeights`'s field order; int8 adds their scales and, packed for
the VNNI kernel, their column sums) and pointed at by one `ShortcutLayerWeights` per layer: the layout is decided
here, in `_pack` (int8: in the layout the library runs, `model.fast.loader.int8_layout`), and C only follows the
named pointers. The dims and weights structs are built once; a call fills one `ShortcutStepArgs`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.decode import StepOutput, check_step_shapes
from model.edits import StreamEdits
from model.fast import abi
from model.fast.loader import default_library, load
from model.fast.loader import int8_layout as library_int8_layout
from model.kv_cache import KVCache

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.transformer import Block, Transformer

log = logging.getLogger(__name__)

KV_DTYPES = (torch.float32, torch.float16)  # the cache dtypes the fused step reads and writes
WEIGHTS = tuple(abi.WEIGHT_FORMATS)  # float32, float16, int8
# ShortcutLayerWeights' fields: the block matrices ((in, out) float16|32, or int8 packed), the float32 vectors, the
# int8 matrices' scales per output column (NULL for float weights) and the int8 quads' column sums (else NULL)
LAYER_MATRICES = ("w_qkv", "w_o", "w_fc", "w_p")
LAYER_SCALES = ("s_qkv", "s_o", "s_fc", "s_p")
LAYER_SUMS = ("z_qkv", "z_o", "z_fc", "z_p")
LAYER_VECTORS = tuple(
    f[0] for f in abi.ShortcutLayerWeights._fields_ if f[0] not in LAYER_MATRICES + LAYER_SCALES + LAYER_SUMS
)


def supports(config: ModelConfig) -> bool:
    """Whether the kernels handle this shape (matrix widths multiples of 16, head width a multiple of 8, at most
    256)."""
    c = config
    hd = c.d_model // c.n_head
    return c.d_model % 16 == 0 and c.d_ff % 16 == 0 and c.vocab_size % 16 == 0 and hd % 8 == 0 and hd <= 256


def _vec(t: torch.Tensor | None, n: int) -> torch.Tensor:
    return t.detach().float().reshape(-1) if t is not None else torch.zeros(n)


def _layer_params(block: Block, C: int, F: int) -> dict[str, torch.Tensor]:
    """One block's parameters by `ShortcutLayerWeights` field: matrices (in, out), vectors (absent biases: zeros)."""
    attn, mlp = block.attn, block.mlp
    return {
        "w_qkv": attn.c_attn.weight.detach().float().t(),
        "w_o": attn.c_proj.weight.detach().float().t(),
        "w_fc": mlp.c_fc.weight.detach().float().t(),
        "w_p": mlp.c_proj.weight.detach().float().t(),
        "ln_1_w": _vec(block.ln_1.weight, C),
        "ln_1_b": _vec(block.ln_1.bias, C),
        "b_qkv": _vec(attn.c_attn.bias, 3 * C),
        "b_o": _vec(attn.c_proj.bias, C),
        "ln_2_w": _vec(block.ln_2.weight, C),
        "ln_2_b": _vec(block.ln_2.bias, C),
        "b_fc": _vec(mlp.c_fc.bias, F),
        "b_p": _vec(mlp.c_proj.bias, C),
    }


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float (in, out) matrix as int8 with a float32 scale per output column: w ~ q * scale, |q| <= 127 (the
    nearest integer, ties to even), scale = max |w[:, j]| / 127 (a column of zeros: scale 0)."""
    scale = w.abs().amax(dim=0) / 127.0  # (out,)
    q = torch.where(scale > 0, w / torch.where(scale > 0, scale, 1.0), 0.0).round().clamp(-127, 127)
    return q.to(torch.int8), scale.float()


def pack_int8_pairs(q: torch.Tensor) -> torch.Tensor:
    """int8 (in, out) as the C step reads it: (in / 2, out, 2), the weights of inputs 2i and 2i + 1 side by side."""
    k, n = q.shape
    return q.reshape(k // 2, 2, n).transpose(1, 2).contiguous()


def pack_int8_quads(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 (in, out) as the C step's VNNI kernel reads it: (in / 4, out, 4), the weights of inputs 4i..4i + 3 side
    by side, and each output's z = 128 * sum over inputs of its weights (int32: the correction of the activations'
    +128 offset)."""
    k, n = q.shape
    return q.reshape(k // 4, 4, n).transpose(1, 2).contiguous(), 128 * q.to(torch.int32).sum(0, dtype=torch.int32)


def _pack(parts: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """`parts` flattened into one contiguous `dtype` tensor, and the address of each part in it."""
    flat = torch.cat([p.to(dtype).reshape(-1) for p in parts]).contiguous()
    base, esz, addrs, n = flat.data_ptr(), flat.element_size(), [], 0
    for p in parts:
        addrs.append(base + n * esz)
        n += p.numel()
    return flat, addrs


_POOLED: weakref.WeakSet[FusedDecoder] = weakref.WeakSet()  # decoders with a thread pool (see `_forked`)


def _after_fork_in_child() -> None:
    for decoder in list(_POOLED):
        decoder._forked()
    _POOLED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class FusedDecoder:
    """The decode step of `FastDecoder` as one C call. `weights`: float16 (block matrices rounded to float16,
    float32 arithmetic, like FastDecoder's float16), float32, or int8 (a scale per output column; each row of a
    matrix's input quantized alone per step, int32 sums). Copies the weights (float16: 6.3 MB for the shipped model;
    float32: 12.6 MB; int8: 3.2 MB). `threads`: the step's threads (a pool in C; the numbers do not depend on
    it). Takes and returns what `FastDecoder` does, and also reads and writes a float16 cache
    (`model.fast.auto_kv_dtype`) and prefills a prompt through the same kernels (`prefill`). `int8_layout`: how int8
    matrices are packed, and so which kernel runs them (`pairs`: AVX2's; `quads`: VNNI's, where the library runs
    it); by default the library's fastest (`model.fast.loader.int8_layout`); the numbers are the same bits either
    way."""

    def __init__(
        self,
        model: Transformer,
        *,
        weights: str = "float16",
        library: Path | None = None,
        threads: int = 1,
        int8_layout: str | None = None,
    ) -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, not {weights!r}")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        library = library or default_library()
        lib = load(str(library))
        if lib is None:
            raise RuntimeError(
                f"fused decode step unavailable ({library} missing, stale, or the CPU lacks its instruction set)"
            )
        self.config = cfg = model.config
        if not supports(cfg):
            raise ValueError("fused decode step: d_model, d_ff, vocab_size must be multiples of 16, head_dim of 8")
        if model.wte.weight.device.type != "cpu":
            raise ValueError("fused decode step runs on CPU only")
        best = library_int8_layout(lib)
        if int8_layout not in (None, "pairs", best):
            raise ValueError(
                f"int8_layout must be 'pairs' or this library's {best!r} (None: {best!r}), not {int8_layout!r}"
            )
        self.weights = weights
        self.isa: str = lib.shortcut_fused_isa().decode()  # avx2 | avx512
        # how the int8 matrices are packed (pairs: the AVX2 kernel; quads: VNNI's); None for float weights
        self.int8_layout: str | None = (int8_layout or best) if weights == "int8" else None
        self.scripted = False  # same attribute as FastDecoder's: this step is not TorchScript (and holds no GIL)
        self._step = lib.shortcut_fused_step
        C, L = cfg.d_model, cfg.n_layer
        params = [_layer_params(b, C, cfg.d_ff) for b in model.layers]
        mats = [p[n] for p in params for n in LAYER_MATRICES]
        scale_ptrs: list[int] = []
        sum_ptrs: list[int] = []
        self._sums = torch.zeros(0, dtype=torch.int32)
        if weights == "int8":
            quantized = [quantize_int8(m) for m in mats]
            if self.int8_layout == "quads":
                quads = [pack_int8_quads(q) for q, _ in quantized]
                self._mats, mat_ptrs = _pack([w for w, _ in quads], torch.int8)
                self._sums, sum_ptrs = _pack([z for _, z in quads], torch.int32)
            else:
                self._mats, mat_ptrs = _pack([pack_int8_pairs(q) for q, _ in quantized], torch.int8)
            self._scales, scale_ptrs = _pack([sc for _, sc in quantized], torch.float)
        else:
            self._mats, mat_ptrs = _pack(mats, torch.half if weights == "float16" else torch.float)
            self._scales = torch.zeros(0)
        self._vecs, vec_ptrs = _pack([p[n] for p in params for n in LAYER_VECTORS], torch.float)
        self._layers = (abi.ShortcutLayerWeights * L)()
        nm, nv = len(LAYER_MATRICES), len(LAYER_VECTORS)
        for i, layer in enumerate(self._layers):
            for name, ptr in zip(LAYER_MATRICES, mat_ptrs[i * nm : (i + 1) * nm], strict=True):
                setattr(layer, name, ptr)
            for name, ptr in zip(LAYER_VECTORS, vec_ptrs[i * nv : (i + 1) * nv], strict=True):
                setattr(layer, name, ptr)
            for name, ptr in zip(LAYER_SCALES, scale_ptrs[i * nm : (i + 1) * nm], strict=False):
                setattr(layer, name, ptr)  # int8 only (float weights: no scales, NULL)
            for name, ptr in zip(LAYER_SUMS, sum_ptrs[i * nm : (i + 1) * nm], strict=False):
                setattr(layer, name, ptr)  # int8 quads only (else NULL)
        self._wte = model.wte.weight.detach().float().contiguous()
        self._wpe = model.wpe.weight.detach().float().contiguous()
        self._unembed_t = self._wte.t().contiguous()  # (C, V)
        self._ln_f_w = _vec(model.ln_f.weight, C).contiguous()
        self._ln_f_b = _vec(model.ln_f.bias, C).contiguous()
        self._dims = abi.ShortcutDims(
            C,
            cfg.n_head,
            L,
            cfg.d_ff,
            cfg.vocab_size,
            cfg.block_size,
            abi.WEIGHT_FORMATS[weights],
            int(cfg.residual),
            abi.INT8_LAYOUTS[self.int8_layout or "pairs"],
        )
        self._weights = abi.ShortcutWeights(
            self._wte.data_ptr(),
            self._wpe.data_ptr(),
            self._unembed_t.data_ptr(),
            self._ln_f_w.data_ptr(),
            self._ln_f_b.data_ptr(),
            ctypes.addressof(self._layers),
        )
        self._dims_ref, self._weights_ref = ctypes.byref(self._dims), ctypes.byref(self._weights)
        # the step's threads: a pool in C (threads - 1 workers asleep between steps), stopped when the decoder goes
        self._pool: int | None = lib.shortcut_fused_pool_new(threads) if threads > 1 else None
        if threads > 1 and not self._pool:
            log.warning("fused decode step: %d threads could not be started; running on one", threads)
        self.threads: int = lib.shortcut_fused_pool_threads(self._pool)
        self._finalizer = weakref.finalize(self, lib.shortcut_fused_pool_free, self._pool)
        if self._pool:
            _POOLED.add(self)

    def _forked(self) -> None:
        """In a forked child: the pool's threads stayed in the parent (joining them would wait forever), so the
        child's steps run on one thread."""
        self._finalizer.detach()
        self._pool, self.threads = None, 1

    def close(self) -> None:
        """Stop the step's threads now (they also stop when the decoder is collected); later steps run on one."""
        self._finalizer()
        self._pool, self.threads = None, 1

    @property
    def packed(self) -> bool:
        """Whether the block matrices are float16."""
        return self.weights == "float16"

    @property
    def quantized(self) -> bool:
        """Whether the block matrices are int8 (activations quantized per row per step)."""
        return self.weights == "int8"

    @property
    def weight_tensors(self) -> tuple[torch.Tensor, ...]:
        """The large tensors the decoder holds its weights in (the block matrices and vectors, the embeddings and the
        unembedding)."""
        return (self._mats, self._scales, self._sums, self._vecs, self._wte, self._wpe, self._unembed_t)

    def __call__(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        pos: torch.Tensor,
        edits: StreamEdits | None = None,
        trace_rows: torch.Tensor | None = None,
    ) -> StepOutput:
        """Logits (B, vocab) for one new token per row (see `FastDecoder.__call__`). Token ids, positions and traced
        rows are range-checked in C before anything is read or written (ValueError)."""
        check_step_shapes(self.config, tokens, cache, pos, edits)
        self._check_cache(cache)
        if cache.k.stride(1) != self.config.n_head * self.config.block_size * self.config.head_dim:
            raise ValueError("the fused step needs a cache with contiguous rows (KVCache or its rows)")
        if tokens.device.type != "cpu" or pos.device.type != "cpu":
            raise ValueError("the fused step runs on CPU tensors")
        return self._run(tokens, pos, cache, cache.k.stride(1), edits, trace_rows)

    def prefill(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        edits: StreamEdits | None = None,
        trace: bool = False,
        all_logits: bool = False,
        start: int = 0,
    ) -> StepOutput:
        """A prompt `tokens` (T,) of one row from position `start`, through the step's own kernels: writes its keys
        and values into the one-row `cache` and returns the last position's logits (1, vocab) (with `all_logits`,
        every position's: (T, vocab)) and, with `trace`, its stream (n_layer + 1, 1, C). `edits`: the row's (one row).

        The T positions go as T rows of one step that share the cache row (row stride 0) at positions
        start..start+T-1: layer by layer, the step writes a row's key and value right before that row attends, in row
        order, so each position attends to itself and every position before it, as a causal forward does. With
        `start` > 0 the cache row must already hold positions 0..start-1 (a chunk of a prompt: each row is computed
        alone, so chunks give the numbers of one piece bit for bit)."""
        cfg = self.config
        T = tokens.shape[0] if tokens.dim() == 1 else -1
        if not 1 <= T <= cfg.block_size - start or start < 0 or cache.n_rows != 1:
            raise ValueError(f"prefill needs 1..{cfg.block_size} - start tokens (T,), start >= 0 and a one-row cache")
        if edits is not None:
            edits.check(1, cfg.n_layer, cfg.d_model)
        if tokens.device.type != "cpu":
            raise ValueError("the fused step runs on CPU tensors")
        self._check_cache(cache)
        # T rows, every one of them the cache's one row (stride 0)
        shared = KVCache.over(cache.k.expand(-1, T, -1, -1, -1), cache.v.expand(-1, T, -1, -1, -1))
        rows = torch.tensor([T - 1]) if trace else None
        out = self._run(
            tokens, torch.arange(start, start + T), shared, 0, edits.expand(T) if edits is not None else None, rows
        )
        return StepOutput(out.logits if all_logits else out.logits[T - 1 :], out.stream)

    def _check_cache(self, cache: KVCache) -> None:
        cfg = self.config
        k, v = cache.k, cache.v
        if (
            k.dtype not in KV_DTYPES
            or v.dtype != k.dtype
            or k.stride() != v.stride()
            or k.stride()[2:] != (cfg.block_size * cfg.head_dim, cfg.head_dim, 1)
            or k.device.type != "cpu"
        ):
            raise ValueError(
                "the fused step needs a float32 or float16 CPU cache with contiguous rows (KVCache or its rows)"
            )

    def _run(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache,
        row_stride: int,
        edits: StreamEdits | None,
        trace_rows: torch.Tensor | None,
    ) -> StepOutput:
        """The C call (shapes and the cache checked by the caller)."""
        cfg = self.config
        B = tokens.shape[0]
        k, v = cache.k, cache.v
        tokens = tokens.to(torch.long).contiguous()
        pos = pos.to(torch.long).contiguous()
        rows = trace_rows.to(device="cpu", dtype=torch.long).contiguous() if trace_rows is not None else None
        R = rows.shape[0] if rows is not None else 0
        logits = torch.empty(B, cfg.vocab_size)
        stream = torch.empty(cfg.n_layer + 1, R, cfg.d_model) if rows is not None else None
        if B == 0:
            return StepOutput(logits, stream)
        c_edits, _alive = abi.edits_struct(edits)  # `_alive`: the tensors c_edits points into, held over the call
        args = abi.ShortcutStepArgs(
            B,
            int(k.dtype == torch.float16),
            tokens.data_ptr(),
            pos.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            k.stride(0),
            row_stride,
            c_edits,
            rows.data_ptr() if rows is not None else None,
            R,
            stream.data_ptr() if stream is not None else None,
            logits.data_ptr(),
            self._pool,
        )
        rc = self._step(self._dims_ref, self._weights_ref, ctypes.byref(args))
        if rc != 0:
            raise ValueError(abi.ERRORS[rc]) if rc in abi.ERRORS else MemoryError("fused decode step: out of memory")
        return StepOutput(logits, stream)
