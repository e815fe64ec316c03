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
