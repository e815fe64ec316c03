"""training.tuned_lens on a tiny model: a few steps lower the KL to the final distribution, and the CLI writes a
lens file the server loads for that checkpoint only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.lens import LensError, TunedLens, lens_path, load_lens
from model.transformer import Transformer
from training import tuned_lens
from training.train import load_splits


def _kl_by_hand(model: Transformer, split: torch.Tensor, lens: TunedLens | None) -> torch.Tensor:
    """Mean KL(final || lens) per layer over every position of non-overlapping windows, one window at a time."""
    T = model.config.block_size
    total = torch.zeros(model.config.n_layer, dtype=torch.float64)
    n = (len(split) - 1) // T
    with torch.no_grad():
        for w in range(n):
            x = split[w * T : (w + 1) * T].long()[None]  # (1, T)
            out = model(x, return_resid=True)
            logp = torch.log_softmax(out.logits[0].double(), -1)  # (T, V)
            for layer, r in enumerate(out.resid or []):
                h = r["resid_post"][0]  # (T, C)
                if lens is not None and layer < model.config.n_layer - 1:
                    h = h + h @ lens.weight[layer].T + lens.bias[layer]
                logq = torch.log_softmax(model.unembed(model.ln_f(h)).double(), -1)
                total[layer] += (logp.exp() * (logp - logq)).sum(-1).mean()
    return total / n


def test_a_few_steps_lower_the_kl(tiny_model: Transformer, text_file: Path) -> None:
    train, val, _ = load_splits(text_file)
    lens, losses = tuned_lens.train_lens(tiny_model, train, steps=40, lr=1e-2, batch_size=8, progress=False)
    assert all(not p.requires_grad for p in tiny_model.parameters())  # the model stayed frozen
    before, after = _kl_by_hand(tiny_model, val, None), _kl_by_hand(tiny_model, val, lens)
    assert (after[:-1] < before[:-1]).all(), (before, after)  # lower at every layer but the last
    assert after[-1] == pytest.approx(before[-1].item(), abs=1e-12)  # the last layer has no translator
    assert sum(losses[-5:]) < sum(losses[:5])
    reported = tuned_lens.validation_kl(tiny_model, val, lens, max_windows=10_000)
    assert reported["logit"] == pytest.approx(before.tolist(), rel=1e-4, abs=1e-6)
    assert reported["tuned"] == pytest.approx(after.tolist(), rel=1e-4, abs=1e-6)


def test_cli_writes_a_lens_beside_the_checkpoint(
    tiny_checkpoint: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tiny_checkpoint.read_bytes()
    tuned_lens.main(["--checkpoint", str(tiny_checkpoint), "--data", str(text_file), "--steps", "5", "--no-progress"])
    out = capsys.readouterr().out.splitlines()
    summary = json.loads(out[-1])
    assert out[0].split() == ["layer", "logit", "KL", "tuned", "KL", "ratio"]
    assert tiny_checkpoint.read_bytes() == before  # the checkpoint (and its sha256) is untouched
    ck = load_checkpoint(tiny_checkpoint)
    lens = load_lens(lens_path(tiny_checkpoint), ck.config, ck.sha256)
    assert summary["checkpoint_sha256"] == ck.sha256 and lens.metadata["steps"] == 5
    assert lens.metadata["val_kl"] == summary["val_kl"] and len(summary["val_kl"]["tuned"]) == ck.config.n_layer
    with pytest.raises(LensError, match="retrain"):
        load_lens(lens_path(tiny_checkpoint), ck.config, "0" * 64)
    png = tiny_checkpoint.parent / "kl.png"
    tuned_lens.main(["--plot", str(png), "--lens", str(lens_path(tiny_checkpoint))])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_one_layer_model_has_nothing_to_train(make_model, text_file: Path) -> None:  # type: ignore[no-untyped-def]
    from model.config import ModelConfig

    one = make_model(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, block_size=16))
    train, _, _ = load_splits(text_file)
    with pytest.raises(ValueError, match="at least 2 layers"):
        tuned_lens.train_lens(one, train, steps=1, lr=1e-2, progress=False)
