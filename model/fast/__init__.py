"""A fused decode step in C (`fused_step.c`): one call per step for every layer and every row, loaded with ctypes.

Built at install time when a C compiler is present (`python -m model.fast.build`, run by `make install`/`make dev`),
twice: for AVX2/FMA/F16C and with AVX-512; the widest build this CPU runs is loaded. Never needed at run time: without
a built library, or on a CPU without AVX2/FMA/F16C, `fused_available()` is False and the TorchScript step
(`model.decode.FastDecoder`) is what runs. ctypes releases the GIL for the whole call, as the TorchScript step does.

`FusedDecoder` takes and returns what `FastDecoder` does (tokens, a `KVCache`, positions, per-row gates, traced
rows -> `StepOutput`) and computes the same maths: see `fused_step.c`. It also reads and writes a float16 cache
(`auto_kv_dtype`), and prefills a prompt through the same kernels (`FusedDecoder.prefill`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.decode import FastDecoder, StepOutput, check_step_shapes
from model.edits import StreamEdits
from model.kv_cache import KVCache

if TYPE_CHECKING:
    from model.transformer import Transformer

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fused_step.c"
CFLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared")
# two builds of the same source: 8-wide AVX2 kernels, and 16-wide AVX-512 ones for the CPUs that have it
ISA_CFLAGS = {
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"),
}
ISA_CPU_FLAGS = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512bw", "avx512dq"),
}
LIBRARIES = {"avx2": HERE / "_fused_step.so", "avx512": HERE / "_fused_step_avx512.so"}
LIBRARY = LIBRARIES["avx2"]
KV_DTYPES = (torch.float32, torch.float16)  # the cache dtypes the fused step reads and writes


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


def cpu_supported(isa: str = "avx2") -> bool:
    """Whether this CPU runs the `isa` build (x86-64 with AVX2, FMA and F16C; `avx512` also AVX-512 F/VL/BW/DQ)."""
    return all(f in _cpu_flags() for f in ISA_CPU_FLAGS[isa])


def build(out: Path | None = None, compiler: str | None = None, isa: str = "avx2") -> Path | None:
    """Compile the `isa` build with the system C compiler; None (and a log line) when there is none or it fails.

    Building needs only the compiler: the AVX-512 library is built on any x86-64 machine (the image's builder may
    not be the machine it runs on) and loaded only where the CPU has AVX-512."""
    out = out or LIBRARIES[isa]
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("fused decode step not built (no C compiler)")
        return None
    tmp = out.with_suffix(".so.tmp")
    try:
        cmd = [cc, *CFLAGS, *ISA_CFLAGS[isa], str(SOURCE), "-o", str(tmp), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log.warning("fused decode step (%s) failed to build: %s", isa, proc.stderr.strip()[-2000:])
            return None
        tmp.replace(out)
    except OSError as e:  # the compiler named by CC is missing, or the folder is read-only
        log.warning("fused decode step not built: %s", e)
        return None
    return out


def build_all(compiler: str | None = None) -> dict[str, Path | None]:
    """Both builds next to the source (what `python -m model.fast.build` does)."""
    return {isa: build(compiler=compiler, isa=isa) for isa in LIBRARIES}


@functools.cache
def _library(path: str) -> ctypes.CDLL | None:
    """The loaded library (ctypes.CDLL: the GIL is released during calls), or None where it is missing or this CPU
    lacks its instruction set (asked of the library before any of its kernels runs)."""
    if not Path(path).exists():
        return None
    try:
        lib = ctypes.CDLL(path)
        lib.shortcut_fused_isa.restype = ctypes.c_char_p
        isa = lib.shortcut_fused_isa().decode()
    except (OSError, AttributeError) as e:
        log.warning("fused decode step library %s not loadable: %s", path, e)
        return None
    if isa not in ISA_CPU_FLAGS or not cpu_supported(isa):
        return None
    fn = lib.shortcut_fused_step
    i, p, i64 = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [i, i, i, i, i, i, i, i, i, i, p, p, p, p, i64, i64, p, p, p, p, p, p, p, p, p, i, p, p]
    fn.restype = ctypes.c_int
    return lib


def default_library() -> Path:
    """The widest build that is there and runs on this CPU (AVX-512, else AVX2); the AVX2 path when neither does."""
    for isa in ("avx512", "avx2"):
        if _library(str(LIBRARIES[isa])) is not None:
            return LIBRARIES[isa]
    return LIBRARY


def library_isa(path: Path) -> str | None:
    """The instruction set of a loadable library at `path` (`avx2`, `avx512`), or None."""
    lib = _library(str(path))
    return lib.shortcut_fused_isa().decode() if lib is not None else None


def fused_available(path: Path | None = None) -> bool:
    """Whether a built library (`path`, or the default one) is there and this CPU runs it."""
    return _library(str(path or default_library())) is not None


def supports(config: object) -> bool:
    """Whether the kernels handle this shape (matrix widths multiples of 16, head width a multiple of 8, at most
    256)."""
    c = config
    hd = c.d_model // c.n_head  # type: ignore[attr-defined]
    return c.d_model % 16 == 0 and c.d_ff % 16 == 0 and c.vocab_size % 16 == 0 and hd % 8 == 0 and hd <= 256  # type: ignore[attr-defined]


class FusedDecoder:
    """The decode step of `FastDecoder` as one C call. `weights`: float16 (block matrices rounded to float16,
    float32 arithmetic, like FastDecoder's float16) or float32. Copies the weights (float16: 6.3 MB for the shipped
    model; float32: 12.6 MB)."""

    def __init__(self, model: Transformer, *, weights: str = "float16", library: Path | None = None) -> None:
        if weights not in ("float32", "float16"):
            raise ValueError(f"weights must be 'float32' or 'float16', not {weights!r}")
        library = library or default_library()
        self._lib = _library(str(library))
        if self._lib is None:
            raise RuntimeError(f"fused decode step unavailable ({library} missing or CPU lacks AVX2/FMA/F16C)")
        self.config = cfg = model.config
        if not supports(cfg):
            raise ValueError("fused decode step: d_model, d_ff, vocab_size must be multiples of 16, head_dim of 8")
        if model.wte.weight.device.type != "cpu":
            raise ValueError("fused decode step runs on CPU only")
        self.weights = weights
        C, Fd = cfg.d_model, cfg.d_ff
        half = weights == "float16"

        def mat(lin: torch.nn.Linear) -> torch.Tensor:  # (in, out), flattened
            w = lin.weight.detach().float().t().contiguous()
            return (w.half() if half else w).reshape(-1)

        def vec(t: torch.Tensor | None, n: int) -> torch.Tensor:
            return t.detach().float().reshape(-1) if t is not None else torch.zeros(n)

        mats, vecs = [], []
        for b in model.blocks:
            mats += [mat(b.attn.c_attn), mat(b.attn.c_proj), mat(b.mlp.c_fc), mat(b.mlp.c_proj)]
            vecs += [
                vec(b.ln_1.weight, C),
                vec(b.ln_1.bias, C),
                vec(b.attn.c_attn.bias, 3 * C),
                vec(b.attn.c_proj.bias, C),
                vec(b.ln_2.weight, C),
                vec(b.ln_2.bias, C),
                vec(b.mlp.c_fc.bias, Fd),
                vec(b.mlp.c_proj.bias, C),
            ]
        self._mats = torch.cat(mats).contiguous()
        self._vecs = torch.cat(vecs).contiguous()
        self._wte = model.wte.weight.detach().float().contiguous()
        self._wpe = model.wpe.weight.detach().float().contiguous()
        self._unembed_t = self._wte.t().contiguous()  # (C, V)
        self._ln_f_w = vec(model.ln_f.weight, C).contiguous()
        self._ln_f_b = vec(model.ln_f.bias, C).contiguous()
        self.isa = self._lib.shortcut_fused_isa().decode()  # avx2 | avx512
        self.scripted = False  # same attribute as FastDecoder's: this step is not TorchScript (and holds no GIL)
        self._shape = (
            cfg.d_model,
            cfg.n_head,
            cfg.n_layer,
            cfg.d_ff,
            cfg.vocab_size,
            cfg.block_size,
            int(half),
            int(cfg.residual),
        )
        self._weight_ptrs = tuple(
            t.data_ptr()
            for t in (self._wte, self._wpe, self._unembed_t, self._ln_f_w, self._ln_f_b, self._mats, self._vecs)
        )

    @property
    def packed(self) -> bool:
        """Whether the block matrices are float16."""
        return self.weights == "float16"

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
        self, tokens: torch.Tensor, cache: KVCache, edits: StreamEdits | None = None, trace: bool = False
    ) -> StepOutput:
        """A prompt `tokens` (T,) of one row from position 0, through the step's own kernels: writes its keys and
        values into the one-row `cache` and returns the last position's logits (1, vocab) and, with `trace`, its
        stream (n_layer + 1, 1, C). `edits`: the row's (one row).

        The T positions go as T rows of one step that share the cache row (row stride 0) at positions 0..T-1:
        layer by layer, the step writes a row's key and value right before that row attends, in row order, so each
        position attends to itself and every position before it, as a causal forward does."""
        cfg = self.config
        T = tokens.shape[0] if tokens.dim() == 1 else -1
        if not 1 <= T <= cfg.block_size or cache.n_rows != 1:
            raise ValueError(f"prefill needs 1..{cfg.block_size} tokens (T,) and a one-row cache")
        if edits is not None:
            edits.check(1, cfg.n_layer)
        if tokens.device.type != "cpu":
            raise ValueError("the fused step runs on CPU tensors")
        self._check_cache(cache)
        # T rows, every one of them the cache's one row (stride 0)
        shared = KVCache.over(cache.k.expand(-1, T, -1, -1, -1), cache.v.expand(-1, T, -1, -1, -1))
        rows = torch.tensor([T - 1]) if trace else None
        out = self._run(tokens, torch.arange(T), shared, 0, edits.expand(T) if edits is not None else None, rows)
        return StepOutput(out.logits[T - 1 :], out.stream)

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
        gates = edits.gates if edits is not None else None
        cfg = self.config
        B = tokens.shape[0]
        k, v = cache.k, cache.v
        tokens = tokens.to(torch.long).contiguous()
        pos = pos.to(torch.long).contiguous()
        g = gates.to(torch.float32).contiguous() if gates is not None else None
        rows = trace_rows.to(device="cpu", dtype=torch.long).contiguous() if trace_rows is not None else None
        R = rows.shape[0] if rows is not None else 0
        logits = torch.empty(B, cfg.vocab_size)
        stream = torch.empty(cfg.n_layer + 1, R, cfg.d_model) if rows is not None else None
        if B == 0:
            return StepOutput(logits, stream)
        rc = self._lib.shortcut_fused_step(
            B,
            *self._shape,
            int(k.dtype == torch.float16),
            tokens.data_ptr(),
            pos.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            k.stride(0),
            row_stride,
            *self._weight_ptrs,
            g.data_ptr() if g is not None else None,
            rows.data_ptr() if rows is not None else None,
            R,
            stream.data_ptr() if stream is not None else None,
            logits.data_ptr(),
        )
        if rc != 0:
            raise _ERRORS.get(rc, MemoryError("fused decode step: out of memory"))
        return StepOutput(logits, stream)


_ERRORS = {  # return codes of shortcut_fused_step
    -2: ValueError("token ids outside the vocabulary"),
    -3: ValueError("positions must be in [0, block_size)"),
    -4: ValueError("trace_rows outside the batch"),
}


BACKENDS = ("auto", "fused", "torchscript")


def make_decoder(
    model: Transformer, weights: str, backend: str = "auto", library: Path | None = None
) -> FusedDecoder | FastDecoder:
    """The engine's decode step: `fused` (this module; an error where it is not built or cannot run the model),
    `torchscript` (`FastDecoder`), or `auto`: fused where it is built, runs on this CPU and handles the shape,
    else TorchScript."""
    if backend not in BACKENDS:
        raise ValueError(f"decode backend must be one of {BACKENDS}, not {backend!r}")
    on_cpu = model.wte.weight.device.type == "cpu"
    if backend == "fused" or (backend == "auto" and on_cpu and supports(model.config) and fused_available(library)):
        return FusedDecoder(model, weights=weights, library=library)
    return FastDecoder(model, weights=weights)


def auto_kv_dtype(decoder: object, model_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The KV cache dtype `auto` means for a decode step: float16 for the fused step with float16 weights (the keys
    and values rounded once, as the weights are; attention then reads half the bytes), else the model's."""
    if isinstance(decoder, FusedDecoder) and decoder.weights == "float16" and model_dtype == torch.float32:
        return torch.float16
    return model_dtype


def weight_bytes(dec: FusedDecoder) -> int:
    """Bytes the decoder holds for its weights."""
    return sum(t.numel() * t.element_size() for t in (dec._mats, dec._vecs, dec._wte, dec._wpe, dec._unembed_t))


__all__ = [
    "BACKENDS",
    "FusedDecoder",
    "auto_kv_dtype",
    "KV_DTYPES",
    "LIBRARIES",
    "build",
    "build_all",
    "default_library",
    "library_isa",
    "cpu_supported",
    "fused_available",
    "make_decoder",
    "supports",
    "weight_bytes",
]
