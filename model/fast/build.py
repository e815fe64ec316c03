"""`python -m model.fast.build`: compile the fused decode step (`fused_step.c`) next to itself, if a C compiler is
present and the CPU has AVX2/FMA/F16C; otherwise say so and exit 0 (the TorchScript step is used)."""

from __future__ import annotations

import logging
import sys

from model.fast import build


def main() -> int:
    """Build; exit status 0 either way (a missing compiler is not an error)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = build()
    logging.getLogger(__name__).info("fused decode step: %s", out or "not built; the TorchScript step will be used")
    return 0


if __name__ == "__main__":
    sys.exit(main())
