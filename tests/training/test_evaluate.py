"""Sliding-window evaluation: coverage, determinism, agreement with a brute-force computation, and the CLI."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import ModelConfig
from model.transformer import Transformer
from training.evaluate import evaluate, main, plan_windows, round_linear_weights_to_float16
from training.train import load_splits

ROOT = Path(__file__).resolve().parents[2]


def _bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _context_start(t: int, n_targets: int, block: int) -> int:
    """Where the context of target position t starts, written out from the spec independently of plan_windows."""
    if n_targets <= block or t <= block:
        return 0
    stride = max(1, block // 2)
    start = math.ceil((t - block) / stride) * stride  # the first full window whose last `stride` targets hold t
    return min(start, n_targets - block)  # past the last full window: the tail window ends at the last byte


@torch.no_grad()
def _brute_force_sum(model: Transformer, data: torch.Tensor) -> float:
    """Sum of -log p(data[t] | data[c(t):t]) with one full forward per target."""
    tokens, block, total = data.long(), model.config.block_size, 0.0
    for t in range(1, len(data)):
        c = _context_start(t, len(data) - 1, block)
        assert 1 <= t - c <= block
        logits = model(tokens[c:t][None]).logits[0, -1]  # (V,)
        total += F.cross_entropy(logits[None].double(), tokens[t : t + 1]).item()
    return total


@settings(max_examples=300, deadline=None)
@given(n_bytes=st.integers(0, 400), block=st.integers(1, 40))
def test_plan_scores_every_target_once_with_half_a_block_of_context(n_bytes: int, block: int) -> None:
    seen: list[int] = []
    for w in plan_windows(n_bytes, block):
        assert w.start >= 0 and w.start + w.length <= n_bytes - 1  # inputs and shifted targets stay inside
        assert w.length == min(block, n_bytes - 1)
        for j in range(w.skip, w.length):
            t = w.start + j + 1
            seen.append(t)
            assert j + 1 >= min(t, math.ceil(block / 2))  # context: all of it, or at least half a block
            assert _context_start(t, n_bytes - 1, block) == w.start
    assert sorted(seen) == list(range(1, n_bytes)) and len(seen) == len(set(seen))


@pytest.mark.parametrize("block", [8, 7])
@pytest.mark.parametrize("n_bytes", [2, 5, 8, 9, 10, 13, 20, 37, 61])
def test_matches_brute_force(make_model, tiny_config: ModelConfig, block: int, n_bytes: int) -> None:
    model = make_model(dataclasses.replace(tiny_config, block_size=block, n_layer=2))
    data = _bytes(n_bytes, seed=n_bytes)
    result = evaluate(model, data, batch_size=3)
    expected = _brute_force_sum(model, data)
    assert result["bytes_scored"] == n_bytes - 1
    assert result["sum_nats"] == pytest.approx(expected, rel=1e-5)
    assert result["nats_per_byte"] == pytest.approx(expected / (n_bytes - 1), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(result["nats_per_byte"] / math.log(2), rel=1e-12)


def test_short_split_equals_one_full_forward(tiny_model: Transformer) -> None:
    data = _bytes(20).long()  # shorter than block_size (32)
    with torch.no_grad():
        logits = tiny_model(data[None, :-1]).logits[0]  # (19, V)
    expected = F.cross_entropy(logits, data[1:]).item()
    result = evaluate(tiny_model, data.to(torch.uint8))
    assert result["bytes_scored"] == 19
    assert result["nats_per_byte"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n_bytes", [12, 33, 200, 1001])
def test_bytes_scored_is_split_length_minus_one(tiny_model: Transformer, n_bytes: int) -> None:
    assert evaluate(tiny_model, _bytes(n_bytes))["bytes_scored"] == n_bytes - 1


def test_deterministic_and_batch_size_independent(tiny_model: Transformer) -> None:
    data = _bytes(700)
    a, b = evaluate(tiny_model, data, batch_size=4), evaluate(tiny_model, data, batch_size=4)
    assert a == b
    c = evaluate(tiny_model, data, batch_size=1)
    assert c["bytes_scored"] == a["bytes_scored"]
    assert c["nats_per_byte"] == pytest.approx(a["nats_per_byte"], rel=1e-6)


def test_eval_mode_during_evaluation_and_training_mode_restored(make_model, tiny_config: ModelConfig) -> None:
    model = make_model(dataclasses.replace(tiny_config, dropout=0.5))
    data = _bytes(100)
    reference = evaluate(model, data)
    model.train()
    assert evaluate(model, data) == reference  # dropout is off while scoring
    assert model.training


def test_rejects_too_little_data(tiny_model: Transformer) -> None:
    with pytest.raises(ValueError):
        evaluate(tiny_model, _bytes(1))
    with pytest.raises(ValueError):
        evaluate(tiny_model, _bytes(10).view(2, 5))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("split", ["val", "train", "all"])
def test_cli_prints_json_summary(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, tiny_model: Transformer, text_file: Path, split: str
) -> None:
    main(["--checkpoint", str(tiny_checkpoint), "--data", str(text_file), "--split", split, "--batch-size", "8"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train_split, val_split, _ = load_splits(text_file)
    data = {"val": val_split, "train": train_split, "all": torch.cat([train_split, val_split])}[split]
    assert out["split"] == split
    assert out["bytes_scored"] == len(data) - 1
    assert out["checkpoint"] == str(tiny_checkpoint)
    assert out["checkpoint_sha256"] == _sha(tiny_checkpoint)
    assert out["data_sha256"] == _sha(text_file)
    assert out["seconds"] >= 0
    expected = evaluate(tiny_model, data, batch_size=8)
    assert out["nats_per_byte"] == pytest.approx(expected["nats_per_byte"], rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(expected["nats_per_byte"] / math.log(2), rel=1e-6)


def test_cli_float16_weights_score_the_rounded_model(
    capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, tiny_model: Transformer, text_file: Path
) -> None:
    main(["--checkpoint", str(tiny_checkpoint), "--data", str(text_file), "--weights", "float16"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rounded = copy.deepcopy(tiny_model)
    round_linear_weights_to_float16(rounded)
    fc = rounded.blocks[0].mlp.c_fc.weight
    assert torch.equal(fc, fc.half().float()) and not torch.equal(fc, tiny_model.blocks[0].mlp.c_fc.weight)
    _, val_split, _ = load_splits(text_file)
    assert out["weights"] == "float16"
    assert out["nats_per_byte"] == pytest.approx(evaluate(rounded, val_split)["nats_per_byte"], rel=1e-6)
    assert out["nats_per_byte"] != pytest.approx(evaluate(tiny_model, val_split)["nats_per_byte"], rel=1e-9)


def test_cli_module_entry_point(tiny_checkpoint: Path, text_file: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "training.evaluate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(text_file),
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    required = {
        "nats_per_byte",
        "bits_per_byte",
        "bytes_scored",
        "checkpoint_sha256",
        "split",
        "checkpoint",
        "data_sha256",
        "seconds",
    }
    assert required <= set(out)
    assert out["split"] == "val" and out["checkpoint_sha256"] == _sha(tiny_checkpoint)


def test_cli_rejects_a_split_too_short(tmp_path: Path, tiny_checkpoint: Path) -> None:
    data = tmp_path / "short.txt"
    data.write_bytes(b"abcdefghi")  # 9 bytes: the val split holds 1 byte
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoint), "--data", str(data)])


def test_through_a_kv_cache_scores_what_the_server_computes(tiny_model: Transformer) -> None:
    """A float32 cache changes nothing; a float16 one rounds keys and values (close, not the same numbers)."""
    data = _bytes(300)
    plain = evaluate(tiny_model, data, batch_size=4)
    f32 = evaluate(tiny_model, data, batch_size=4, kv_dtype=torch.float32)
    f16 = evaluate(tiny_model, data, batch_size=4, kv_dtype=torch.float16)
    assert f32["nats_per_byte"] == pytest.approx(plain["nats_per_byte"], rel=1e-6)
    assert f16["nats_per_byte"] == pytest.approx(plain["nats_per_byte"], rel=1e-3)
    assert f16["sum_nats"] != plain["sum_nats"]
    assert f16["bytes_scored"] == plain["bytes_scored"]
