"""The pure helpers behind the benchmark's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.stats import median, meets, percentile, rate, ratio

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(deadline=None, max_examples=60)
@given(st.lists(finite, min_size=1, max_size=50), st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_percentile_known_values() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # order must not matter
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert median(xs) == 2.5
    assert percentile(xs, 99) == pytest.approx(3.97)  # 3 + 0.97 * (4 - 3)
    assert percentile([7.0], 99) == 7.0


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None
    assert median([]) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_ratio_and_targets() -> None:
    assert ratio(10.0, 4.0) == 2.5
    assert ratio(None, 4.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
    assert meets(5.0, 5.0) is True
    assert meets(4.9, 5.0) is False
    assert meets(1.4, 1.5, higher_is_better=False) is True
    assert meets(1.6, 1.5, higher_is_better=False) is False
    assert meets(None, 1.0) is None
    assert rate(10, 2.0) == 5.0
    assert rate(10, 0.0) is None
