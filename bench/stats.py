"""Small pure helpers for benchmark numbers: percentiles, medians, ratios and target checks."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between order statistics (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Sequence[float]) -> float | None:
    """The median (50th percentile); None if empty."""
    return percentile(values, 50.0)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def meets(value: float | None, target: float, higher_is_better: bool = True) -> bool | None:
    """Whether `value` reaches `target` (>= when higher is better, else <=); None when there is no value."""
    if value is None:
        return None
    return value >= target if higher_is_better else value <= target


def rate(count: float, seconds: float) -> float | None:
    """count / seconds, or None for a non-positive duration."""
    return count / seconds if seconds > 0 else None
