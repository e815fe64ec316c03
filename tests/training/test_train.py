"""Training: the shared train step and plot helper, a smoke run that learns, determinism for a seed, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer
from training.evaluate import evaluate
from training.plotting import figure
from training.train import TrainConfig, batch_at, get_batch, load_splits, lr_at, make_optimizer, train, train_step

MC = ModelConfig(block_size=32, n_layer=2, n_head=4, d_model=32, d_ff=64)
# lr == min_lr: the schedule after warmup is flat, so it does not depend on max_steps (needed to compare resumes).
FLAT = TrainConfig(
    batch_size=8, lr=5e-3, min_lr=5e-3, warmup_steps=3, max_steps=16, eval_every=8, eval_batches=2, seed=3
)


def _resume_path(out: Path) -> Path:
    return out.with_name(out.stem + ".resume.safetensors")


def test_load_splits_is_90_10(text_file: Path) -> None:
    data = text_file.read_bytes()
    train_split, val_split, sha = load_splits(text_file)
    n = int(0.9 * len(data))
    assert bytes(train_split.tolist()) == data[:n] and bytes(val_split.tolist()) == data[n:]
    assert len(sha) == 64


def test_get_batch_targets_are_shifted_inputs() -> None:
    split = torch.arange(100, dtype=torch.uint8)
    x, y = get_batch(split, 8, 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="too short"):
        get_batch(split[:9], 8, 4, torch.Generator())


def test_lr_schedule() -> None:
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(60, tc) == pytest.approx(0.55) and lr_at(110, tc) == pytest.approx(0.1)
    assert lr_at(500, tc) == pytest.approx(0.1)


def test_batch_at_is_seeded_by_seed_and_step() -> None:
    split = torch.arange(200, dtype=torch.uint8)
    tc = TrainConfig(batch_size=4, seed=5)
    x, y = batch_at(split, 8, tc, 3)
    x2, _ = batch_at(split, 8, tc, 3)
    want, _ = get_batch(split, 8, 4, torch.Generator().manual_seed(5 * 1_000_003 + 3))
    assert torch.equal(x, x2) and torch.equal(x, want) and torch.equal(y[:, :-1], x[:, 1:])
    assert not torch.equal(batch_at(split, 8, tc, 4)[0], x)


def test_train_step_is_one_clipped_adamw_step_at_the_given_lr() -> None:
    torch.manual_seed(0)
    model = Transformer(MC)
    twin = Transformer(MC)
    twin.load_state_dict(model.state_dict())
    tc = TrainConfig(lr=1.0, grad_clip=0.5)
    opt, opt_twin = make_optimizer(model, tc), make_optimizer(twin, tc)
    x, y = get_batch(torch.randint(0, 256, (500,), dtype=torch.uint8), MC.block_size, 4, torch.Generator())
    loss, norm = train_step(model, opt, x, y, lr=3e-3, grad_clip=0.5)
    # the same step written out
    for g in opt_twin.param_groups:
        g["lr"] = 3e-3
    ref = torch.nn.functional.cross_entropy(twin(x).logits.flatten(0, 1), y.flatten())
    ref.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    opt_twin.step()
    assert loss == pytest.approx(ref.item()) and norm == pytest.approx(ref_norm.item())
    assert norm > 0.5  # the clip was active, so the comparison covers it
    assert all(g["lr"] == 3e-3 for g in opt.param_groups)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_figure_writes_a_png_and_skips_it_on_error(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    with figure(tmp_path / "a.png", ncols=2) as (fig, axes):
        axes[0].plot([0, 1], [1, 0])
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RuntimeError), figure(tmp_path / "b.png"):
        raise RuntimeError("boom")
    assert not (tmp_path / "b.png").exists()
    assert not plt.get_fignums()  # both figures closed


def test_smoke_run_learns_and_writes_artifacts(tmp_path: Path, text_file: Path) -> None:
    tc = TrainConfig(
        batch_size=16, lr=1e-2, min_lr=1e-3, warmup_steps=5, max_steps=50, eval_every=25, eval_batches=4, seed=1
    )
    out = tmp_path / "run" / "tiny.safetensors"
    _, val_split, data_sha = load_splits(text_file)
    torch.manual_seed(tc.seed)
    initial = evaluate(Transformer(MC), val_split)["nats_per_byte"]  # the model train() starts from
    summary = train(text_file, out, MC, tc, progress=False)
    assert summary["steps"] == 50 and summary["tokens_seen"] == 50 * 16 * 32
    ck = load_checkpoint(out)
    assert ck.config == MC
    assert ck.metadata["training_data_sha256"] == data_sha and ck.metadata["steps"] in (25, 50)
    final = evaluate(ck.model, val_split)["nats_per_byte"]
    assert initial > 5.0  # about ln(256) = 5.55 at initialisation
    assert final < initial - 1.5
    history = json.loads(out.with_name("tiny.history.json").read_text())
    evals = [h for h in history if h["val_loss"] is not None]
    assert [h["step"] for h in evals] == [25, 50]
    assert evals[-1]["val_loss"] < initial - 1.5
    assert summary["best_val_loss"] == min(h["val_loss"] for h in evals)
    png = out.with_name("tiny.loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert _resume_path(out).exists()


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    """Weights and optimizer state at the end of a run (the resume file holds the last step, not the best)."""
    return load_file(str(_resume_path(out)))


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory, shared_text_file: Path) -> tuple[Path, Path]:
    """One uninterrupted FLAT run; returns (data file, checkpoint path)."""
    out = tmp_path_factory.mktemp("straight") / "m.safetensors"
    train(shared_text_file, out, MC, FLAT, progress=False)
    return shared_text_file, out


def test_same_seed_gives_identical_weights(tmp_path: Path, straight_run: tuple[Path, Path]) -> None:
    data, first = straight_run
    again = tmp_path / "again.safetensors"
    train(data, again, MC, FLAT, progress=False)
    _assert_same_state(_final_state(first), _final_state(again))
    other = tmp_path / "other.safetensors"
    train(data, other, MC, TrainConfig(**{**FLAT.__dict__, "seed": 4}), progress=False)
    assert not torch.equal(_final_state(first)["wte.weight"], _final_state(other)["wte.weight"])


def test_resume_equals_an_uninterrupted_run(tmp_path: Path, straight_run: tuple[Path, Path]) -> None:
    data, straight = straight_run
    out = tmp_path / "m.safetensors"
    half = TrainConfig(**{**FLAT.__dict__, "max_steps": FLAT.max_steps // 2})
    train(data, out, MC, half, progress=False)
    assert load_checkpoint(_resume_path(out)).metadata["train_state"]["step"] == FLAT.max_steps // 2
    summary = train(data, out, MC, FLAT, resume=True, progress=False)
    assert summary["steps"] == FLAT.max_steps
    assert summary["tokens_seen"] == FLAT.max_steps * FLAT.batch_size * MC.block_size
    _assert_same_state(_final_state(straight), _final_state(out))
    val = [h["val_loss"] for h in json.loads(out.with_name("m.history.json").read_text()) if h["val_loss"]]
    ref = [h["val_loss"] for h in json.loads(straight.with_name("m.history.json").read_text()) if h["val_loss"]]
    assert val == ref


def test_resume_can_turn_dropout_on_and_keeps_the_weights(tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "m.safetensors"
    half = TrainConfig(**{**FLAT.__dict__, "max_steps": FLAT.max_steps // 2})
    train(text_file, out, MC, half, progress=False)
    before = load_checkpoint(_resume_path(out)).model.state_dict()
    one_more = TrainConfig(**{**half.__dict__, "max_steps": half.max_steps + 1, "eval_every": 1})
    train(text_file, out, MC, one_more, resume=True, resume_dropout=0.2, progress=False)
    resumed = load_checkpoint(_resume_path(out))
    assert resumed.config.dropout == 0.2 and resumed.metadata["train_state"]["step"] == half.max_steps + 1
    after = resumed.model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all((before[k] - after[k]).abs().max() < 0.1 for k in before)  # one small step from there
