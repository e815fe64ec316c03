"""The compiler driver of the fused decode step, and its CLI.

`python -m model.fast.build` (run by `make install`/`make dev` and the Docker image) compiles `fused_step.c` (with
its header `fused_step.h`) next to itself, twice: an AVX2/FMA/F16C build and an AVX-512 one. Which build runs is
chosen at load time by the CPU's flags (`model.fast.loader`). Without a C compiler it says so and exits 0: the
TorchScript step is used.

Building needs only the compiler: the AVX-512 library is built on any x86-64 machine (the image's builder may not be
the machine it runs on) and loaded only where the CPU has AVX-512 (its int8 VNNI kernels run only where the CPU also
has AVX512_VNNI). `build(out, isa="avx2-vnni-emulated")` is a test-only build (never built by `build_all` nor loaded
by default): the AVX2 library with the VNNI kernels, their one instruction emulated exactly in scalar code, so that
a machine without VNNI runs them (tests/model/test_fused_vnni.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from model.fast.abi import HEADER, LIBRARIES, SOURCE
from model.fast.loader import default_library, fused_available

log = logging.getLogger(__name__)

# -ffp-contract=off: only the explicit FMAs fuse, so both builds sum in the same order (bitwise-equal numbers)
CFLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
ISA_CFLAGS = {  # 8-wide AVX2 kernels, and 16-wide AVX-512 ones for the CPUs that have it
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"),
}
# test-only builds (an explicit `out` only): the VNNI kernels with vpdpbusd emulated (fused_step.c)
TEST_ISA_CFLAGS = {"avx2-vnni-emulated": (*ISA_CFLAGS["avx2"], "-DSHORTCUT_EMULATE_VNNI")}


def build(
    out: Path | None = None, compiler: str | None = None, isa: str = "avx2", cflags: Sequence[str] = ()
) -> Path | None:
    """Compile the `isa` build to `out` (default: next to the source) with the system C compiler (or `compiler`,
    `$CC`); None (and a log line) when there is none or it fails. `cflags`: extra flags (a test builds a stale
    library with `-DSHORTCUT_FUSED_ABI_VERSION=...`)."""
    if out is None and isa not in LIBRARIES:
        raise ValueError(f"the test-only {isa} build needs an explicit `out`")
    out = out or LIBRARIES[isa]
    flags = ISA_CFLAGS[isa] if isa in ISA_CFLAGS else TEST_ISA_CFLAGS[isa]
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("fused decode step not built (no C compiler)")
        return None
    tmp = out.with_suffix(".so.tmp")
    try:
        cmd = [cc, *CFLAGS, *flags, *cflags, f"-I{HEADER.parent}", str(SOURCE), "-o", str(tmp), "-lm"]
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


def main() -> int:
    """Build; exit status 0 either way (a missing compiler is not an error)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for isa, out in build_all().items():
        log.info("fused decode step, %s build: %s", isa, out or "not built")
    if fused_available():
        log.info("this CPU runs %s", default_library().name)
    else:
        log.info("this CPU runs no fused build: the TorchScript step will be used")
    return 0


if __name__ == "__main__":
    sys.exit(main())
