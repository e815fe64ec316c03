"""`python -m bench.ceiling`: its GEMV loops compute a GEMV (checked in C against a scalar one), every figure is
there and positive, and the two-process scaling runs the one-thread step alone and twice at once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import ceiling
from model.checkpoint import save_checkpoint
from model.fast import cpu_supported, fused_available
from tests.conftest import build_model

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


@needs_cc
def test_gemv_loops_compute_a_gemv_and_report_every_figure() -> None:
    if not cpu_supported():
        pytest.skip("CPU without AVX2/FMA/F16C")
    res = ceiling.gemv(reps=2, runs=1)
    assert res["int8_max_err"] == 0  # integer sums: exact
    assert res["f16_max_err"] < 1e-5  # float sums in another order than the scalar one
    for kind in ("f16", "int8"):
        assert res[f"read_{kind}_bytes_ms"] > 0 and res[f"{kind}_gemv_ms"] > 0 and res[f"{kind}_gemv_gb_s"] > 0
        assert res[f"{kind}_gemv_fraction_of_read"] == pytest.approx(
            res[f"read_{kind}_bytes_ms"] / res[f"{kind}_gemv_ms"]
        )


def test_scaling_times_the_step_alone_and_twice_at_once(tmp_path: Path) -> None:
    if not fused_available():
        pytest.skip("the fused step is not built here (python -m model.fast.build)")
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model(seed=0), path)
    res = ceiling.scaling(reps=1, rounds=1, trials=1, checkpoint=path)
    assert len(res["alone_runs"]) == 1 and len(res["together_runs"]) == 2
    assert all(t > 0 for t in res["alone_runs"] + res["together_runs"])
    assert res["two_process_speedup"] == pytest.approx(2 * res["alone_wall_ms"] / res["together_wall_ms"])
