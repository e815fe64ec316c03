"""bench.readout on a tiny model: the export counts its bytes, the batched grid equals the naive one."""

from __future__ import annotations

from collections.abc import Callable

from bench import readout
from model.transformer import Transformer


def test_export_and_patching_grid_on_a_tiny_model(make_model: Callable[..., Transformer]) -> None:
    model = make_model()
    exp = readout.export(model, list(range(10)), reps=1)
    assert exp["array_bytes"] == 10 * 3 * 5 * 32 * 4 and exp["bytes_per_s"] > 0
    grid = readout.patching_grid(model, [1, 2, 3, 4], [1, 9, 3, 4], ("resid_pre", "mlp_out"))
    assert grid["cells"] == 2 * 3 * 4 and grid["batched_equals_naive"]
    assert grid["naive"]["forwards"] == 1 + grid["cells"] and grid["batched"]["forwards"] == 2
