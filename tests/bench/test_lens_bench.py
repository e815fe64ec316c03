"""The tuned_lens bench section on a tiny model: both /diagnostics variants timed, and the lens it times is the one
beside the checkpoint when there is one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from bench import inproc
from bench.sections.inprocess import checkpoint_lens
from model.checkpoint import load_checkpoint
from model.lens import TunedLens, lens_path, save_lens
from model.transformer import Transformer


def test_lens_cost_times_both_lenses(tiny_model: Transformer) -> None:
    L, C = tiny_model.config.n_layer, tiny_model.config.d_model
    lens = TunedLens(torch.randn(L - 1, C, C), torch.randn(L - 1, C))
    out = inproc.lens_cost(tiny_model, lens, list(b"tuned lens bench"), reps=2)
    assert len(out["reps_logit_ms"]) == len(out["reps_tuned_ms"]) == 2
    assert out["diagnostics_logit_lens_ms"] > 0 and out["diagnostics_tuned_lens_ms"] > 0
    assert out["tuned_over_logit"] == out["diagnostics_tuned_lens_ms"] / out["diagnostics_logit_lens_ms"]


def test_the_section_times_the_checkpoints_own_lens(tiny_checkpoint: Path) -> None:
    ck = load_checkpoint(tiny_checkpoint)
    ctx = SimpleNamespace(ckpt=tiny_checkpoint, cfg=ck.config)
    lens, trained = checkpoint_lens(ctx)  # type: ignore[arg-type]
    assert not trained and not lens.weight.any()
    L, C = ck.config.n_layer, ck.config.d_model
    save_lens(lens_path(tiny_checkpoint), torch.ones(L - 1, C, C), torch.ones(L - 1, C), checkpoint_sha256=ck.sha256)
    lens, trained = checkpoint_lens(ctx)  # type: ignore[arg-type]
    assert trained and bool((lens.weight == 1).all())
