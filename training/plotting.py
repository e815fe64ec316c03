"""The one plotting helper of the training code: a matplotlib figure written to a PNG and closed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def figure(
    path: str | Path, *, ncols: int = 1, figsize: tuple[float, float] = (7, 4), sharey: bool = False
) -> Iterator[tuple[Any, Any]]:
    """Yield (fig, axes) from `plt.subplots(1, ncols)`; on a clean exit lay it out and save it as a PNG.

    The figure is closed either way. Uses the Agg backend, so no display is needed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, sharey=sharey)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
