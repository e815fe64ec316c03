"""The CTranslate2 peer computes our model's function, and the pure pieces of the peers/memory sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import memsplit, peers
from model.config import ModelConfig
from tests.conftest import TINY, build_model


@pytest.mark.parametrize("bias", [True, False])
def test_ct2_greedy_equals_ours(tmp_path: Path, bias: bool) -> None:
    pytest.importorskip("ctranslate2")
    model = build_model(ModelConfig(**TINY, bias=bias), seed=7)
    path = peers.convert_ct2(model, tmp_path / "f32", "float32")
    gen = peers.ct2_generator(path, "float32")
    prompts = [[1, 2, 3, 4, 5, 6], [200, 100, 50, 25, 12, 6, 3]]
    n = TINY["block_size"] - 8  # close to the end of the window
    theirs = peers.ct2_greedy(gen, prompts, n)
    assert theirs == [peers.our_greedy(model, p, n) for p in prompts]
    assert len(set(theirs[0])) > 3  # a context-dependent continuation, not one repeated token
    assert peers.tokens_match(model, path, prompts[1], n)["equal"]


def test_ct2_int8_model_is_smaller_and_runs(tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    model = build_model(seed=7)
    f32 = peers.convert_ct2(model, tmp_path / "f32", "float32")
    i8 = peers.convert_ct2(model, tmp_path / "i8", "int8")
    assert (i8 / "model.bin").stat().st_size < 0.6 * (f32 / "model.bin").stat().st_size
    out = peers.ct2_greedy(peers.ct2_generator(i8, "int8"), [[65, 66, 67]], 5)
    assert len(out[0]) == 5 and all(0 <= t < 256 for t in out[0])


def test_ct2_spec_refuses_what_it_cannot_express() -> None:
    pytest.importorskip("ctranslate2")
    with pytest.raises(ValueError, match="non-residual"):
        peers.ct2_spec(build_model(ModelConfig(**TINY, residual=False)))


def test_weight_bytes_counts_every_parameter_once() -> None:
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())  # wte is tied: counted once, like the step reads it
    wpe = model.wpe.weight.numel()
    # every parameter but wpe (one row read per token) at the given width, vectors always float32
    mats = sum(p.numel() for p in model.parameters() if p.dim() == 2) - wpe
    vecs = n_params - mats - wpe
    assert peers.weight_bytes(model, 4.0) == 4 * (mats + vecs + model.config.d_model)
    assert peers.weight_bytes(model, 1.0) == mats + 4 * (vecs + model.config.d_model)


def test_read_bandwidth_is_positive() -> None:
    bw = peers.read_bandwidth(1 << 16, rounds=1)
    assert bw["buffer_bytes"] == 1 << 16 and bw["gb_per_s"] > 0


def test_memory_split_adds_up() -> None:
    st = {
        "python": 10.0,
        "torch_import": 250.0,
        "app_import": 270.0,
        "engine": 300.0,
        "warm": 400.0,
        "kv_full": 450.0,
        "kv_cache_bytes_mb": 128.0,
    }
    s = memsplit.split(st, server_peak_mb=480.0)
    assert s["python_and_torch_import_mb"] == 250 and s["app_import_mb"] == 20 and s["weights_mb"] == 30
    assert s["kv_cache_mb"] == 128 and s["warm_up_and_compiled_steps_mb"] == 450 - 300 - 128
    assert s["sum_mb"] == 450 and s["rest_mb"] == 30
    assert s["kv_resident_after_warm_up_mb"] == 128 - 50
    assert "rest_mb" not in memsplit.split(st)
