"""`python -m bench.fused` on a tiny model: every figure it reports is there and positive."""

from __future__ import annotations

import shutil

import pytest

from bench import fused
from model.fast import cpu_supported
from tests.conftest import build_model


def test_reports_prefill_and_steps_per_build_and_cache() -> None:
    if not cpu_supported():
        pytest.skip("CPU without AVX2/FMA/F16C")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler to build the fused step with")
    res = fused.run(build_model(seed=0), prompt_tokens=5, batches=(1, 3), positions=(1, 4), reps=1, rounds=1)
    assert set(res["prefill_ms"]) == {f"fused_{'avx512' if cpu_supported('avx512') else 'avx2'}", "torch_forward"}
    isas = ["avx2"] + (["avx512"] if cpu_supported("avx512") else [])
    for b in (1, 3):
        for p in (1, 4):
            got = res[f"step_bs{b}_pos{p}_ms"]
            assert set(got) == {f"{i}_{dt}" for i in isas for dt in ("float32", "float16")}
            assert all(v > 0 for v in got.values())
    assert all(v > 0 for v in res["prefill_ms"].values())


def test_step_threads_reports_wall_and_cpu_per_thread_count_and_the_speedup() -> None:
    from model.fast import fused_available

    if not fused_available():
        pytest.skip("the fused step is not built here (python -m model.fast.build)")
    res = fused.step_threads(build_model(seed=0), (1, 2), (1, 3), ("float16", "int8"), position=4, reps=1, rounds=1)
    assert res["threads"] == [1, 2]
    for key in ("float16_bs1", "float16_bs3", "int8_bs1", "int8_bs3"):
        got = res[key]
        assert set(got) == {"threads1", "threads2"}
        assert got["threads1"]["wall_speedup"] == 1.0
        for fig in got.values():
            assert fig["wall_ms"] > 0 and fig["cpu_ms"] > 0
            assert fig["wall_speedup"] == pytest.approx(got["threads1"]["wall_ms"] / fig["wall_ms"], abs=1e-3)


def test_step_threads_times_the_avx2_int8_kernel_beside_the_builds_fastest() -> None:
    """`int8-pairs` runs the AVX2 int8 kernel whatever the build; `int8` the layout the installed build picks."""
    from model.fast import default_library, fused_available
    from model.fast.loader import int8_layout, load

    if not fused_available():
        pytest.skip("the fused step is not built here (python -m model.fast.build)")
    res = fused.step_threads(build_model(seed=0), (1,), (2,), ("int8-pairs", "int8"), position=4, reps=1, rounds=1)
    lib = load(str(default_library()))
    assert lib is not None
    assert res["int8_layout"] == {"int8-pairs": "pairs", "int8": int8_layout(lib)}
    assert res["int8-pairs_bs2"]["threads1"]["wall_ms"] > 0 and res["int8_bs2"]["threads1"]["wall_ms"] > 0
