"""`python -m tests.slow_app`: `python -m app` with every decode step held for TEST_STEP_DELAY_S seconds.

Tests that need requests in flight (a busy row, a full queue, a drain with work left) must not depend on how fast
the decoder happens to be on the machine running them; this pins a lower bound on the time a step takes.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

from app.__main__ import main
from model.decode import FastDecoder
from model.fast import FusedDecoder


def hold_each_step(step: Callable, delay_s: float) -> Callable:
    """`step`, sleeping `delay_s` first (the sleep releases the GIL, like a real step's compute)."""

    @functools.wraps(step)
    def held(*args: object, **kwargs: object) -> object:
        time.sleep(delay_s)
        return step(*args, **kwargs)

    return held


if __name__ == "__main__":
    for step_class in (FastDecoder, FusedDecoder):  # whichever the engine picks (model.fast.make_decoder)
        step_class.__call__ = hold_each_step(step_class.__call__, float(os.environ["TEST_STEP_DELAY_S"]))
    main()
