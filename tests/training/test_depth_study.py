"""Depth study: quick run writes every output from its own numbers; plain blocks have no shortcut; grad norms."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.transformer import Block, Transformer
from training import depth_study
from training.train import TrainConfig, estimate_loss, load_splits

STEPS = 8
WORDS = ["the", "king", "shall", "not", "speak", "of", "love", "and", "war", "my", "lord", "good", "night"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick study run on generated text: its paths, parsed JSON and the CLI's last stdout line."""
    root = tmp_path_factory.mktemp("depth_study")
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400))
    data = root / "corpus.txt"
    data.write_text(text)
    out_dir, ckpt_dir = root / "docs", root / "ckpt"
    buf = io.StringIO()
    with redirect_stdout(buf):
        depth_study.main(
            [
                "--quick",
                "--data",
                str(data),
                "--out-dir",
                str(out_dir),
                "--ckpt-dir",
                str(ckpt_dir),
                "--steps",
                str(STEPS),
            ]
        )
    result = json.loads((out_dir / "depth_study.json").read_text())
    return {
        "data": data,
        "out": out_dir,
        "ckpt": ckpt_dir,
        "result": result,
        "stdout_last": buf.getvalue().strip().splitlines()[-1],
    }


def test_quick_run_writes_every_output(study: dict) -> None:
    out, result = study["out"], study["result"]
    for name in ("depth_study_loss.png", "depth_study_grad.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "depth_study.md").read_text().startswith("# Depth study")
    depths = result["config"]["depths"]
    assert sorted({(r["depth"], r["residual"]) for r in result["runs"]}) == [
        (d, k) for d in depths for k in (False, True)
    ]
    for r in result["runs"]:
        assert [h["step"] for h in r["curve"]][-1] == STEPS
        assert len(r["grad_norms_init"]) == len(r["grad_norms_end"]) == r["depth"]
        assert r["grad_ratio_init"] == pytest.approx(r["grad_norms_init"][0] / r["grad_norms_init"][-1])
        assert r["wall_s"] > 0
    summary = json.loads(study["stdout_last"])
    assert summary["checkpoints"] == result["checkpoints"]


def test_checkpoints_load_with_their_stack_kind(study: dict) -> None:
    deepest = max(study["result"]["config"]["depths"])
    data_sha = hashlib.sha256(study["data"].read_bytes()).hexdigest()
    runs = {(r["depth"], r["kind"]): r for r in study["result"]["runs"]}
    _, val_split, _ = load_splits(study["data"])
    tc = TrainConfig(**study["result"]["train_config"])
    for kind, residual in (("plain", False), ("residual", True)):
        ck = load_checkpoint(study["ckpt"] / f"{kind}-{deepest}.safetensors")
        assert ck.config.residual is residual
        assert ck.config.n_layer == deepest
        assert all(b.residual is residual for b in ck.model.blocks)
        assert ck.metadata["study"] == "depth"
        assert ck.metadata["training_data_sha256"] == data_sha
        assert ck.metadata["steps"] == STEPS
        run = runs[(deepest, kind)]
        assert ck.metadata["val_loss"] == run["final_val_loss"]
        # the reported val loss is this model's: recompute it from the saved weights
        assert estimate_loss(ck.model, val_split, tc, seed=tc.seed + 7) == pytest.approx(
            run["final_val_loss"], rel=1e-5
        )


def _table_rows(md: str) -> dict[tuple[int, str], list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 6 and cells[0].isdigit():
            rows[(int(cells[0]), cells[1])] = cells[2:]
    return rows


def test_table_and_text_use_the_runs_numbers(study: dict) -> None:
    md = (study["out"] / "depth_study.md").read_text()
    rows = _table_rows(md)
    runs = study["result"]["runs"]
    assert set(rows) == {(r["depth"], r["kind"]) for r in runs}
    for r in runs:
        assert rows[(r["depth"], r["kind"])] == [
            f"{r['final_train_loss']:.4f}",
            f"{r['final_val_loss']:.4f}",
            f"{r['grad_ratio_init']:.3g}",
            f"{r['grad_ratio_end']:.3g}",
        ]
    by = {(r["depth"], r["kind"]): r for r in runs}
    for d in study["result"]["config"]["depths"]:
        p, q = by[(d, "plain")]["final_val_loss"], by[(d, "residual")]["final_val_loss"]
        assert f"At depth {d} the plain stack's val loss is {p:.4f} vs {q:.4f} with the shortcut" in md
    for sentence in study["result"]["findings"]:
        assert sentence in md


def _fake_result(vals: dict[tuple[int, str], float]) -> dict:
    runs = [
        {
            "depth": d,
            "kind": k,
            "residual": k == "residual",
            "final_val_loss": v,
            "grad_ratio_init": 0.01 if k == "plain" else 1.2,
            "grad_ratio_end": 0.5,
        }
        for (d, k), v in vals.items()
    ]
    return {"runs": runs, "config": {"steps": 100}}


def test_findings_say_when_numbers_break_the_textbook_story() -> None:
    textbook = depth_study.findings(
        _fake_result({(2, "plain"): 2.0, (2, "residual"): 2.0, (32, "plain"): 3.0, (32, "residual"): 1.8})
    )
    assert not any("does not match" in s or "Unlike" in s for s in textbook)
    assert any("Without the shortcut, depth hurts: val 3.0000 at depth 32 vs 2.0000 at depth 2" in s for s in textbook)
    assert any("shrinks by 100x" in s for s in textbook)
    broken = depth_study.findings(
        _fake_result({(2, "plain"): 2.5, (2, "residual"): 2.0, (32, "plain"): 2.1, (32, "residual"): 2.4})
    )
    assert any(s.startswith("Unlike the textbook story, the deeper plain stack is not worse") for s in broken)
    assert any("the deeper model is worse: val 2.4000 at depth 32 vs 2.0000 at depth 2" in s for s in broken)
    assert any("the plain stack is better by 0.300" in s for s in broken)


def _tiny(residual: bool, n_layer: int = 3) -> ModelConfig:
    return ModelConfig(n_layer=n_layer, n_head=4, d_model=32, d_ff=64, block_size=16, residual=residual)


def test_plain_block_has_no_shortcut() -> None:
    torch.manual_seed(0)
    block = Block(_tiny(residual=False)).eval()
    for p in block.parameters():  # move off the init so no branch is near zero
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 8, 32)  # (B, T, C)
    with torch.no_grad():
        got = block(x)
        a = block.attn(block.ln_1(x))
        composed = block.mlp(block.ln_2(a))  # (B, T, C)
        h = x + a
        shortcut = h + block.mlp(block.ln_2(h))
        res_block = Block(_tiny(residual=True)).eval()
        res_block.load_state_dict(block.state_dict())
        res_got = res_block(x)
    torch.testing.assert_close(got, composed)
    assert not torch.allclose(got, x + composed, atol=1e-3)
    assert not torch.allclose(got, shortcut, atol=1e-3)
    torch.testing.assert_close(res_got, shortcut)


@pytest.mark.parametrize("residual", [False, True])
def test_resid_grad_norms_match_autograd(residual: bool) -> None:
    torch.manual_seed(1)
    model = Transformer(_tiny(residual, n_layer=4))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model.train()
    idx = torch.randint(0, 256, (3, 12))  # (B, T)
    y = torch.randint(0, 256, (3, 12))
    got = depth_study.resid_grad_norms(model, idx, y)
    assert model.training
    twin = copy.deepcopy(model)
    h = twin.wte(idx) + twin.wpe(torch.arange(12))  # (B, T, C)
    inputs = []
    for block in twin.blocks:
        inputs.append(h)
        h = block(h)
    loss = F.cross_entropy(twin.unembed(twin.ln_f(h)).flatten(0, 1), y.flatten())
    want = [g.norm().item() for g in torch.autograd.grad(loss, inputs)]
    assert got == pytest.approx(want, rel=1e-4)
    assert len(set(round(w, 6) for w in want)) == len(want)  # layers really differ
    assert all(p.grad is None for p in model.parameters())  # a probe, not a training step


def test_default_study_is_the_specified_setup() -> None:
    sc = depth_study.StudyConfig()
    assert sc.depths == (2, 8, 32)
    mc = sc.model_config(32, residual=False)
    assert (mc.d_model, mc.n_head, mc.d_ff, mc.block_size, mc.residual) == (64, 4, 256, 64, False)
    assert sc.model_config(8, residual=True).residual is True
    tc = sc.train_config()
    assert (tc.batch_size, tc.max_steps, tc.lr, tc.grad_clip) == (16, sc.steps, sc.lr, TrainConfig().grad_clip)


def test_too_short_data_fails_clearly(tmp_path: Path) -> None:
    short = tmp_path / "tiny.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        depth_study.run_study(short, tmp_path / "o", tmp_path / "c", depth_study.QUICK)


def test_flow_text_handles_a_gradient_that_underflows_to_zero() -> None:
    from training.depth_study import _flow

    assert "vanishes" in _flow(0.0)
    assert "shrinks by 100x" in _flow(0.01)
