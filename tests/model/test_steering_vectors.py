"""model.steering: the contrastive mean difference equals an independent computation; the vector file round-trips
and every kind of bad file is refused with an error naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from model import tokenizer
from model.steering import (
    FORMAT,
    SteeringFileError,
    SteeringVector,
    contrast,
    contrast_job,
    load_vector,
    save_vector,
)
from model.transformer import Transformer
from tests.conftest import build_model
from tests.helpers import run_job

POSITIVE = ["THE QUICK FOX", "A LAZY DOG SLEEPS"]
NEGATIVE = ["the quick fox", "a lazy dog sleeps", "my old friend"]


def independent_resid_post(model: Transformer, ids: list[int], layer: int) -> torch.Tensor:
    """resid_post[layer] (T, C) by running the blocks by hand (no return_resid)."""
    idx = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    x = model.wte(idx) + model.wpe(pos)
    for block in list(model.layers)[: layer + 1]:
        x = block(x)
    return x[0]


def run(gen):  # noqa: ANN001, ANN201
    """Drive a job generator to its end; (its value, the number of yields)."""
    return run_job(gen)


@pytest.mark.parametrize("reduce", ["mean", "last"])
@pytest.mark.parametrize("layer", [0, 2])
def test_contrast_equals_an_independent_computation(tiny_model: Transformer, reduce: str, layer: int) -> None:
    pos = [tokenizer.encode(t) for t in POSITIVE]
    neg = [tokenizer.encode(t) for t in NEGATIVE]
    (vector, counts), yields = run(contrast_job(pos, neg, layer, reduce)(tiny_model))  # type: ignore[arg-type]
    with torch.no_grad():

        def reduced(ids: list[int]) -> torch.Tensor:
            r = independent_resid_post(tiny_model, ids, layer)
            return r.mean(0) if reduce == "mean" else r[-1]

        want = torch.stack([reduced(i) for i in pos]).mean(0) - torch.stack([reduced(i) for i in neg]).mean(0)
    assert counts == (2, 3)
    assert yields == 5  # one slice per forward
    assert vector.dtype == torch.float32 and vector.shape == (tiny_model.config.d_model,)
    torch.testing.assert_close(vector, want, rtol=1e-5, atol=1e-5)
    assert float(vector.norm()) > 0.1


def test_contrast_refuses_bad_arguments(tiny_model: Transformer) -> None:
    ids = [tokenizer.encode("abc")]
    for args, msg in [
        ((ids, ids, 3, "mean"), "layer 3 is out of range"),
        ((ids, ids, 0, "max"), "reduce"),
        (([], ids, 0, "mean"), "positive needs at least one prompt"),
        ((ids, [[]], 0, "mean"), "negative[0] is 0 tokens"),
        ((ids, [[1] * 33], 0, "mean"), "negative[0] is 33 tokens"),
    ]:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            run(contrast(tiny_model, *args))  # type: ignore[arg-type]


def make_vector(name: str = "upper", d: int = 8, **kw: object) -> SteeringVector:
    base: dict[str, object] = dict(
        name=name,
        model="tiny",
        checkpoint_sha256="ab" * 32,
        layer=1,
        vector=torch.arange(d, dtype=torch.float32) - 3,
        positive=2,
        negative=3,
        reduce="mean",
        source="contrast",
        created=1_700_000_000,
    )
    return SteeringVector(**{**base, **kw})  # type: ignore[arg-type]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    vec = make_vector()
    path = tmp_path / "upper.safetensors"
    save_vector(path, vec)
    got = load_vector(path)
    assert got.metadata() == vec.metadata()
    torch.testing.assert_close(got.vector, vec.vector, rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["upper.safetensors"]  # no temporary file left behind


def test_exclusive_save_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "upper.safetensors"
    save_vector(path, make_vector(), exclusive=True)
    with pytest.raises(FileExistsError):
        save_vector(path, make_vector(layer=0), exclusive=True)
    assert load_vector(path).layer == 1
    save_vector(path, make_vector(layer=0))  # replacing is allowed without exclusive
    assert load_vector(path).layer == 0
    assert [p.name for p in tmp_path.iterdir()] == ["upper.safetensors"]


def test_save_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    for vec in [make_vector(name="a/b"), make_vector(vector=torch.tensor([1.0, float("nan")]))]:
        with pytest.raises(ValueError):
            save_vector(tmp_path / "x.safetensors", vec)


def raw_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    path.write_bytes(save(tensors, metadata=meta))
    return path


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m, t: m.pop("checkpoint_sha256"), "lacks checkpoint_sha256"),
        (lambda m, t: m.update(format="shortcut-lm/1"), "not a steering vector file"),
        (lambda m, t: m.update(layer="-1"), "layer"),
        (lambda m, t: m.update(layer="1.5"), "layer"),
        (lambda m, t: m.update(positive="many"), "positive"),
        (lambda m, t: m.update(created="yesterday"), "created"),
        (lambda m, t: m.update(checkpoint_sha256="xyz"), "checkpoint_sha256"),
        (lambda m, t: m.update(model="a b"), "model"),
        (lambda m, t: m.update(name="other"), "named after it"),
        (lambda m, t: m.update(source="magic"), "source"),
        (lambda m, t: m.update(reduce="max"), "reduce"),
        (lambda m, t: t.update(vector=torch.ones(2, 4)), "shape"),
        (lambda m, t: t.update(vector=torch.ones(8, dtype=torch.float16)), "float32"),
        (lambda m, t: t.update(vector=torch.tensor([1.0, float("inf")])), "NaN or inf"),
        (lambda m, t: t.update(extra=torch.ones(2)), "one tensor"),
    ],
)
def test_load_refuses_bad_files_naming_them(tmp_path: Path, change, problem: str) -> None:  # noqa: ANN001
    meta = make_vector().metadata()
    tensors = {"vector": make_vector().vector}
    change(meta, tensors)
    path = raw_file(tmp_path / "upper.safetensors", tensors, meta)
    with pytest.raises(SteeringFileError, match=problem) as e:
        load_vector(path)
    assert str(e.value).startswith(str(path))


def test_load_refuses_non_safetensors_bytes(tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {"format": FORMAT}}).encode()
    for data in [b"", b"\x00" * 5, struct.pack("<Q", 1 << 40) + b"{}", struct.pack("<Q", 3) + b"[1]", b"PK\x03\x04"]:
        path = tmp_path / "bad.safetensors"
        path.write_bytes(data)
        with pytest.raises(SteeringFileError, match=str(path)):
            load_vector(path)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(SteeringFileError, match="one tensor"):
        load_vector(path)
    with pytest.raises(SteeringFileError, match="cannot read"):
        load_vector(tmp_path / "missing.safetensors")


def test_a_pickle_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "upper.safetensors"
    torch.save({"vector": torch.ones(8)}, path)
    with pytest.raises(SteeringFileError):
        load_vector(path)


def test_contrast_runs_on_a_model_without_residual() -> None:
    from model.config import ModelConfig

    model = build_model(ModelConfig(n_layer=2, n_head=2, d_model=8, d_ff=16, block_size=16, residual=False))
    (vector, _), _ = run(contrast(model, [[65, 66]], [[97, 98]], 1, "last"))
    want = independent_resid_post(model, [65, 66], 1)[-1] - independent_resid_post(model, [97, 98], 1)[-1]
    torch.testing.assert_close(vector, want.detach(), rtol=1e-5, atol=1e-5)
