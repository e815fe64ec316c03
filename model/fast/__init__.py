"""A fused decode step in C: one call per step for every layer and every row, loaded with ctypes.

- `fused_step.c` / `fused_step.h`: the step, and its boundary as structs (dims, weights, stream edits, one step's
  arguments) with an ABI version.
- `abi`: the ctypes mirrors of those structs, ABI_VERSION, and `edits_struct` (a `StreamEdits` as `ShortcutEdits`).
- `build`: the compiler driver (`python -m model.fast.build`, run by `make install`/`make dev`): an AVX2/FMA/F16C
  build and an AVX-512 one.
- `loader`: the CPU's flags, the widest build this CPU runs, and the refusal of a stale library.
- `decoder`: `FusedDecoder`, which takes and returns what `model.decode.FastDecoder` does (tokens, a `KVCache`,
  positions, `StreamEdits`, traced rows -> `StepOutput`) and computes the same maths, also with a float16 cache, and
  prefills a prompt through the same kernels.
- `cpus`: the CPUs this process may use (affinity, cgroup quota): the step's default thread count.
- here: the backend policy (`make_decoder`, `auto_kv_dtype`) and the names the rest of the code imports.

Never needed at run time: without a built, current library, or on a CPU without AVX2/FMA/F16C, `fused_available()`
is False and the TorchScript step (`model.decode.FastDecoder`) is what runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.decode import FastDecoder
from model.fast.abi import LIBRARIES
from model.fast.cpus import available_cpus
from model.fast.decoder import KV_DTYPES, WEIGHTS, FusedDecoder, supports
from model.fast.loader import cpu_supported, default_library, fused_available, library_isa

if TYPE_CHECKING:
    from model.fast.build import build, build_all
    from model.transformer import Transformer

BACKENDS = ("auto", "fused", "torchscript")


def decode_threads(threads: int) -> int:
    """The fused step's threads for a setting: `threads`, or 0 for the CPUs this process may use
    (`model.fast.cpus.available_cpus`: affinity and cgroup quota)."""
    if threads < 0:
        raise ValueError(f"decode threads must be 0 (the CPUs this process may use) or more, not {threads}")
    return threads or available_cpus()


def make_decoder(
    model: Transformer, weights: str, backend: str = "auto", library: Path | None = None, threads: int = 1
) -> FusedDecoder | FastDecoder:
    """The engine's decode step: `fused` (an error where it is not built or cannot run the model), `torchscript`
    (`FastDecoder`), or `auto`: fused where a current build is there, runs on this CPU and handles the shape, else
    TorchScript. `threads`: the fused step's (0: the CPUs this process may use). int8 weights need the fused step."""
    if backend not in BACKENDS:
        raise ValueError(f"decode backend must be one of {BACKENDS}, not {backend!r}")
    on_cpu = model.wte.weight.device.type == "cpu"
    if backend == "fused" or (backend == "auto" and on_cpu and supports(model.config) and fused_available(library)):
        return FusedDecoder(model, weights=weights, library=library, threads=decode_threads(threads))
    if weights == "int8":
        raise ValueError(
            "int8 decode weights need the fused C step (build it with `python -m model.fast.build`, on an x86-64 CPU "
            "with AVX2/FMA/F16C), or set SHORTCUT_DECODE_WEIGHTS to float16 or float32"
        )
    return FastDecoder(model, weights=weights)


def auto_kv_dtype(decoder: object, model_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The KV cache dtype `auto` means for a decode step: float16 for the fused step with float16 or int8 weights (the
    keys and values rounded once, as the weights are; attention then reads half the bytes), else the model's."""
    if isinstance(decoder, FusedDecoder) and decoder.weights != "float32" and model_dtype == torch.float32:
        return torch.float16
    return model_dtype


def weight_bytes(dec: FusedDecoder) -> int:
    """Bytes the decoder holds for its weights."""
    return sum(t.numel() * t.element_size() for t in dec.weight_tensors)


def __getattr__(name: str) -> Any:
    """`build` and `build_all` from `model.fast.build`, imported on first use: importing that module with the package
    would make `python -m model.fast.build` run a module that is already imported (runpy warns)."""
    if name in ("build", "build_all"):
        module = importlib.import_module("model.fast.build")
        globals().update(build=module.build, build_all=module.build_all)  # the functions, not the submodule
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "KV_DTYPES",
    "WEIGHTS",
    "LIBRARIES",
    "FusedDecoder",
    "auto_kv_dtype",
    "available_cpus",
    "build",
    "build_all",
    "cpu_supported",
    "decode_threads",
    "default_library",
    "fused_available",
    "library_isa",
    "make_decoder",
    "supports",
    "weight_bytes",
]
