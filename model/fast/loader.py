"""Finding and loading a build of the fused decode step: the CPU's flags, the library's instruction set and ABI.

A library is used only when it is there, this CPU runs its instruction set (asked of the library before any of its
kernels runs) and it reports the ABI version `model.fast.abi` mirrors. A stale library (built from an older header,
or without `shortcut_fused_abi_version`) is refused with one warning naming the fix, and `fused_available` is False,
so `make_decoder("auto")` runs the TorchScript step. ctypes.CDLL releases the GIL for the whole call.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

from model.fast.abi import ABI_VERSION, INT8_LAYOUTS, LIBRARIES, ShortcutDims, ShortcutStepArgs, ShortcutWeights

log = logging.getLogger(__name__)

ISA_CPU_FLAGS = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512bw", "avx512dq"),
}


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


def _abi_version(lib: ctypes.CDLL) -> int | None:
    try:
        fn = lib.shortcut_fused_abi_version
    except AttributeError:
        return None  # built before the library had an ABI version
    fn.argtypes, fn.restype = [], ctypes.c_int
    return int(fn())


@functools.cache
def load(path: str) -> ctypes.CDLL | None:
    """The loaded library at `path` with its functions typed, or None where it is missing, this CPU lacks its
    instruction set, or it is stale (a warning, once per path)."""
    if not Path(path).exists():
        return None
    try:
        lib = ctypes.CDLL(path)
        lib.shortcut_fused_isa.restype = ctypes.c_char_p
        isa = lib.shortcut_fused_isa().decode()
    except (OSError, AttributeError) as e:
        log.warning("fused decode step library %s not loadable: %s; using the TorchScript step", path, e)
        return None
    if isa not in ISA_CPU_FLAGS or not cpu_supported(isa):
        return None
    version = _abi_version(lib)
    if version != ABI_VERSION or not all(
        hasattr(lib, f)
        for f in (
            "shortcut_fused_step",
            "shortcut_fused_layout",
            "shortcut_fused_pool_new",
            "shortcut_fused_int8_layout",
        )
    ):
        log.warning(
            "fused decode step library %s is stale (ABI %s, need %d): rebuild with `python -m model.fast.build`; "
            "using the TorchScript step",
            path,
            version if version is not None else "none",
            ABI_VERSION,
        )
        return None
    fn = lib.shortcut_fused_step
    fn.argtypes = [ctypes.POINTER(ShortcutDims), ctypes.POINTER(ShortcutWeights), ctypes.POINTER(ShortcutStepArgs)]
    fn.restype = ctypes.c_int
    lib.shortcut_fused_pool_new.argtypes, lib.shortcut_fused_pool_new.restype = [ctypes.c_int], ctypes.c_void_p
    lib.shortcut_fused_pool_free.argtypes, lib.shortcut_fused_pool_free.restype = [ctypes.c_void_p], None
    lib.shortcut_fused_pool_threads.argtypes, lib.shortcut_fused_pool_threads.restype = [ctypes.c_void_p], ctypes.c_int
    layout = lib.shortcut_fused_layout
    layout.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]
    layout.restype = ctypes.c_char_p
    lib.shortcut_fused_int8_layout.argtypes, lib.shortcut_fused_int8_layout.restype = [], ctypes.c_int
    return lib


def default_library() -> Path:
    """The widest build that is there and runs on this CPU (AVX-512, else AVX2); the AVX2 path when neither does."""
    for isa in ("avx512", "avx2"):
        if load(str(LIBRARIES[isa])) is not None:
            return LIBRARIES[isa]
    return LIBRARIES["avx2"]


def library_isa(path: Path) -> str | None:
    """The instruction set of a usable library at `path` (`avx2`, `avx512`), or None."""
    lib = load(str(path))
    return lib.shortcut_fused_isa().decode() if lib is not None else None


def fused_available(path: Path | None = None) -> bool:
    """Whether a usable library (`path`, or the default one) is there: built, current, and this CPU runs it."""
    return load(str(path or default_library())) is not None


def int8_layout(lib: ctypes.CDLL) -> str:
    """The int8 layout (`abi.INT8_LAYOUTS`) of the fastest int8 kernel `lib` runs on this CPU: `quads` (VNNI) where
    it has the VNNI kernel and the CPU AVX512_VNNI and AVX512VL, else `pairs`."""
    code = int(lib.shortcut_fused_int8_layout())
    return next(name for name, c in INT8_LAYOUTS.items() if c == code)


def layout(lib: ctypes.CDLL) -> dict[str, tuple[int, int]]:
    """The library's struct layout table: "Struct" -> (0, size), "Struct.field" -> (offset, size), as compiled."""
    out: dict[str, tuple[int, int]] = {}
    offset, size = ctypes.c_int64(), ctypes.c_int64()
    i = 0
    while (name := lib.shortcut_fused_layout(i, ctypes.byref(offset), ctypes.byref(size))) is not None:
        out[name.decode()] = (offset.value, size.value)
        i += 1
    return out
