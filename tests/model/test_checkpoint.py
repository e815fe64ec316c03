"""Checkpoints: round trip, and a CheckpointError naming the file and the problem for every bad file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import tokenizer
from model.checkpoint import FORMAT, CheckpointError, load_checkpoint, read_checkpoint_info, save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer


def _header(config: ModelConfig | dict, metadata: dict | None = None) -> dict[str, str]:
    """Header metadata in the format model/checkpoint.py writes."""
    cfg = config.to_dict() if isinstance(config, ModelConfig) else config
    meta = {"tokenizer": tokenizer.KIND, **(metadata or {})}
    return {"format": FORMAT, "config": json.dumps(cfg), "metadata": json.dumps(meta)}


def _weights(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _expect_error(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@torch.no_grad()
def test_round_trip(tmp_path: Path, tiny_model: Transformer) -> None:
    path = tmp_path / "sub" / "model.safetensors"
    extra = {"opt.0.step": torch.tensor(3.0), "opt.0.exp_avg": torch.randn(4, 5)}
    sha = save_checkpoint(tiny_model, path, metadata={"steps": 12, "val_loss": 1.5}, extra=extra)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(path.parent.glob("*.tmp"))
    ck = load_checkpoint(path)
    assert ck.sha256 == sha and ck.path == path
    assert ck.config == tiny_model.config
    assert ck.metadata["steps"] == 12 and ck.metadata["val_loss"] == 1.5
    assert ck.metadata["tokenizer"] == tokenizer.KIND and "created_at" in ck.metadata
    assert set(ck.extra) == set(extra) and all(torch.equal(ck.extra[k], v) for k, v in extra.items())
    assert not ck.model.training
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ck.model(idx).logits, tiny_model(idx).logits)
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[name], value)
    config, meta = read_checkpoint_info(path)
    assert config == tiny_model.config and meta == ck.metadata


def test_half_precision_weights_load_as_float32(tmp_path: Path, tiny_model: Transformer) -> None:
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in _weights(tiny_model).items()}, str(path), metadata=_header(tiny_model.config))
    ck = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in ck.model.parameters())
    torch.testing.assert_close(ck.model.wte.weight, tiny_model.wte.weight.half().float())


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.safetensors", "not found")


def test_directory_is_refused(tmp_path: Path) -> None:
    _expect_error(tmp_path, "not a regular file")


@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"just some text, not a checkpoint at all\n" * 20, b"\x00\x01", b""],
    ids=["random", "text", "tiny", "empty"],
)
def test_not_safetensors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    _expect_error(path, "not a safetensors file")


def test_header_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"not json!!!!" + b"\x00" * 64)
    _expect_error(path, "not a safetensors file", "not JSON")


def test_huge_header_declaration(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b'{"a": 1}')
    _expect_error(path, "header too large", str(2**40))


def test_truncated_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    data = tiny_checkpoint.read_bytes()
    for name, cut in [("data", len(data) - 100), ("header", 40)]:
        path = tmp_path / f"cut-{name}.safetensors"
        path.write_bytes(data[:cut])
        _expect_error(path, "truncated")


def test_not_our_format(tmp_path: Path, tiny_model: Transformer) -> None:
    path = tmp_path / "other.safetensors"
    save_file(_weights(tiny_model), str(path))  # a valid safetensors file without our header
    _expect_error(path, "not a shortcut-lm checkpoint")


def test_bad_config(tmp_path: Path, tiny_model: Transformer) -> None:
    path = tmp_path / "cfg.safetensors"
    save_file(_weights(tiny_model), str(path), metadata=_header({**tiny_model.config.to_dict(), "n_layers": 3}))
    _expect_error(path, "bad config", "n_layers")
    save_file(_weights(tiny_model), str(path), metadata=_header({**tiny_model.config.to_dict(), "d_model": -1}))
    _expect_error(path, "bad config", "d_model")


def test_other_tokenizer(tmp_path: Path, tiny_model: Transformer) -> None:
    path = tmp_path / "tok.safetensors"
    save_file(_weights(tiny_model), str(path), metadata=_header(tiny_model.config, {"tokenizer": "bpe-50k"}))
    _expect_error(path, "unsupported tokenizer", "bpe-50k")


def test_missing_tensor(tmp_path: Path, tiny_model: Transformer) -> None:
    weights = _weights(tiny_model)
    del weights["blocks.1.mlp.c_fc.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(weights, str(path), metadata=_header(tiny_model.config))
    _expect_error(path, "missing", "blocks.1.mlp.c_fc.weight")


def test_extra_tensor(tmp_path: Path, tiny_model: Transformer) -> None:
    weights = _weights(tiny_model)
    weights["blocks.0.attn.surprise"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(weights, str(path), metadata=_header(tiny_model.config))
    _expect_error(path, "unexpected", "blocks.0.attn.surprise")


def test_shape_mismatch(tmp_path: Path, tiny_model: Transformer) -> None:
    weights = _weights(tiny_model)
    weights["blocks.2.attn.c_attn.weight"] = torch.zeros(10, 32)
    path = tmp_path / "shape.safetensors"
    save_file(weights, str(path), metadata=_header(tiny_model.config))
    _expect_error(path, "blocks.2.attn.c_attn.weight", "(10, 32)", "(96, 32)")


@pytest.mark.parametrize("claimed", [2, 4])
def test_config_lies_about_n_layer(tmp_path: Path, tiny_model: Transformer, claimed: int) -> None:
    cfg = {**tiny_model.config.to_dict(), "n_layer": claimed}  # the weights have 3 layers
    path = tmp_path / "lie.safetensors"
    save_file(_weights(tiny_model), str(path), metadata=_header(cfg))
    msg = _expect_error(path, f"n_layer={claimed}")
    assert ("unexpected ['blocks.2." in msg) if claimed == 2 else ("missing ['blocks.3." in msg)


def test_integer_weights(tmp_path: Path, tiny_model: Transformer) -> None:
    weights = _weights(tiny_model)
    weights["ln_f.weight"] = torch.ones(32, dtype=torch.int32)
    path = tmp_path / "int.safetensors"
    save_file(weights, str(path), metadata=_header(tiny_model.config))
    _expect_error(path, "ln_f.weight", "dtype")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path: Path, tiny_model: Transformer, bad: float) -> None:
    weights = _weights(tiny_model)
    weights["blocks.1.ln_2.weight"][5] = bad
    path = tmp_path / "nan.safetensors"
    save_file(weights, str(path), metadata=_header(tiny_model.config))
    _expect_error(path, "blocks.1.ln_2.weight", "NaN or inf")


class _Exploit:
    """Unpickling this object would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_is_never_unpickled(tmp_path: Path, tiny_model: Transformer, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"state_dict": tiny_model.state_dict(), "hook": _Exploit(marker)}
    path = tmp_path / "model.safetensors"  # the name promises safetensors; the content is a pickle
    if kind == "pickle":
        path.write_bytes(pickle.dumps(payload))  # building the file is safe; only loading it would not be
    else:
        torch.save(payload, path)
    _expect_error(path, "not a safetensors file")
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        read_checkpoint_info(path)
    assert not marker.exists()


_CFG = json.dumps(ModelConfig(block_size=8, n_layer=1, n_head=1, d_model=4, d_ff=4).to_dict())


@pytest.mark.parametrize(
    "header",
    [
        pytest.param({"x": 5}, id="tensor-entry-not-object"),
        pytest.param({"x": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}}, id="offsets-not-list"),
        pytest.param({"__metadata__": [1]}, id="metadata-not-object"),
        pytest.param({"__metadata__": {"format": FORMAT, "config": _CFG, "metadata": "[1]"}}, id="metadata-json-list"),
    ],
)
def test_malformed_header_structure(tmp_path: Path, header: dict) -> None:
    raw = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 16)
    _expect_error(path)
