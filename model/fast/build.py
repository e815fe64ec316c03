"""`python -m model.fast.build`: compile the fused decode step (`fused_step.c`) next to itself, an AVX2 and an
AVX-512 build, if a C compiler is present; otherwise say so and exit 0 (the TorchScript step is used). Which build
runs is chosen at load time by the CPU's flags."""

from __future__ import annotations

import logging
import sys

from model.fast import build_all, default_library, fused_available


def main() -> int:
    """Build; exit status 0 either way (a missing compiler is not an error)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = build_all()
    log = logging.getLogger(__name__)
    for isa, out in built.items():
        log.info("fused decode step, %s build: %s", isa, out or "not built")
    if fused_available():
        log.info("this CPU runs %s", default_library().name)
    else:
        log.info("this CPU runs no fused build: the TorchScript step will be used")
    return 0


if __name__ == "__main__":
    sys.exit(main())
