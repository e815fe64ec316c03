"""The fused step's C boundary in Python: ctypes mirrors of the structs in `fused_step.h`, field for field.

`ABI_VERSION` must equal the header's SHORTCUT_FUSED_ABI_VERSION: the loader (`model.fast.loader`) refuses a library
that reports another one. tests/model/test_fused_abi.py holds every mirror's offsets and sizes to the library's own
layout table (`shortcut_fused_layout`) and this constant to the header.

Data pointers are `c_void_p` here (the header types them): an address is a plain int, so filling a struct from
`Tensor.data_ptr()` costs no conversion. `edits_struct` is the one place a `StreamEdits` becomes a `ShortcutEdits`;
adding an edit kind touches model/edits.py, the header, `edit_update` in fused_step.c and that function (see the
header's comment).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from model.edits import StreamEdits

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fused_step.c"
HEADER = HERE / "fused_step.h"
# two builds of the same source (model.fast.build); the loader takes the widest one this CPU runs
LIBRARIES = {"avx2": HERE / "_fused_step.so", "avx512": HERE / "_fused_step_avx512.so"}

ABI_VERSION = 5  # == SHORTCUT_FUSED_ABI_VERSION in fused_step.h

_i32, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p

WEIGHT_FORMATS = {"float32": 0, "float16": 1, "int8": 2}  # SHORTCUT_WEIGHTS_* in the header
# SHORTCUT_INT8_*: int8 matrices as (in / 2, out, 2) pairs (the AVX2 kernel) or (in / 4, out, 4) quads with their
# column sums (the VNNI kernel); a library says which it runs fastest (`shortcut_fused_int8_layout`)
INT8_LAYOUTS = {"pairs": 0, "quads": 1}


class ShortcutDims(ctypes.Structure):
    """The model's shape and number formats (fixed per decoder)."""

    _fields_ = [
        ("d_model", _i32),
        ("n_head", _i32),
        ("n_layer", _i32),
        ("d_ff", _i32),
        ("vocab_size", _i32),
        ("block_size", _i32),
        ("weights", _i32),  # the block matrices' format: WEIGHT_FORMATS
        ("residual", _i32),
        ("int8_layout", _i32),  # how int8 matrices are packed: INT8_LAYOUTS
    ]


class ShortcutLayerWeights(ctypes.Structure):
    """One block's parameters: a pointer per parameter (shapes in the header; `model.fast.decoder.LAYER_PARAMS`)."""

    _fields_ = [
        ("w_qkv", _ptr),
        ("w_o", _ptr),
        ("w_fc", _ptr),
        ("w_p", _ptr),
        ("ln_1_w", _ptr),
        ("ln_1_b", _ptr),
        ("b_qkv", _ptr),
        ("b_o", _ptr),
        ("ln_2_w", _ptr),
        ("ln_2_b", _ptr),
        ("b_fc", _ptr),
        ("b_p", _ptr),
        ("s_qkv", _ptr),  # int8 weights' scales per output column (float32), else NULL
        ("s_o", _ptr),
        ("s_fc", _ptr),
        ("s_p", _ptr),
        ("z_qkv", _ptr),  # int8 quads: 128 * each output column's sum of int8 weights (int32), else NULL
        ("z_o", _ptr),
        ("z_fc", _ptr),
        ("z_p", _ptr),
    ]


class ShortcutWeights(ctypes.Structure):
    """Every parameter; `layers` points at an array of n_layer ShortcutLayerWeights."""

    _fields_ = [
        ("wte", _ptr),
        ("wpe", _ptr),
        ("unembed_t", _ptr),
        ("ln_f_w", _ptr),
        ("ln_f_b", _ptr),
        ("layers", _ptr),
    ]


class ShortcutEdits(ctypes.Structure):
    """A step's stream edits per row (`StreamEdits`); a NULL field changes nothing."""

    _fields_ = [
        ("gates", _ptr),  # (B, n_layer, 2) float32
        ("add", _ptr),  # (B, n_layer, 2, d_model) float32: [.., 0] at prompt positions, [.., 1] at generated ones
        ("n_prompt", _ptr),  # (B,) int64, with add
    ]


class ShortcutStepArgs(ctypes.Structure):
    """One step's arguments and outputs."""

    _fields_ = [
        ("B", _i32),
        ("kv_half", _i32),
        ("tokens", _ptr),
        ("pos", _ptr),
        ("k_cache", _ptr),
        ("v_cache", _ptr),
        ("layer_stride", _i64),
        ("row_stride", _i64),
        ("edits", ShortcutEdits),
        ("trace_rows", _ptr),
        ("R", _i32),
        ("stream", _ptr),
        ("logits", _ptr),
        ("pool", _ptr),  # a ShortcutPool (shortcut_fused_pool_new) or NULL: one thread
    ]


STRUCTS: tuple[type[ctypes.Structure], ...] = (
    ShortcutDims,
    ShortcutLayerWeights,
    ShortcutWeights,
    ShortcutEdits,
    ShortcutStepArgs,
)

ERRORS = {  # return codes of shortcut_fused_step (SHORTCUT_E* in the header); -1: out of memory
    -2: "token ids outside the vocabulary",
    -3: "positions must be in [0, block_size)",
    -4: "trace_rows outside the batch",
    -5: "int8 weights packed in a layout this library cannot run on this CPU",
}


def edits_struct(edits: StreamEdits | None) -> tuple[ShortcutEdits, tuple[torch.Tensor, ...]]:
    """The C view of a step's `edits` (already checked against the step's shape), and the tensors it points into:
    keep those alive until the call returns. The one place that knows both `StreamEdits` and `ShortcutEdits`."""
    if edits is None:
        return ShortcutEdits(), ()
    alive: list[torch.Tensor] = []

    def pointer(t: torch.Tensor | None, dtype: torch.dtype) -> int | None:
        if t is None:
            return None
        alive.append(t.to(device="cpu", dtype=dtype).contiguous())
        return alive[-1].data_ptr()

    add = edits.add if edits.n_prompt is not None else None  # `check` holds them together; C reads n_prompt with add
    c = ShortcutEdits(
        pointer(edits.gates, torch.float32),
        pointer(add, torch.float32),
        pointer(edits.n_prompt if add is not None else None, torch.int64),
    )
    return c, tuple(alive)


def header_abi_version(header: Path = HEADER) -> int:
    """SHORTCUT_FUSED_ABI_VERSION as the header defines it."""
    for line in header.read_text().splitlines():
        parts = line.split()
        if parts[:2] == ["#define", "SHORTCUT_FUSED_ABI_VERSION"]:
            return int(parts[2])
    raise ValueError(f"{header} defines no SHORTCUT_FUSED_ABI_VERSION")
