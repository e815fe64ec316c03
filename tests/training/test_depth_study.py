"""Depth study: a quick run writes every output from its own numbers; LR sweep; plain init; baseline; grad norms."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
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
SWEEP_STEPS = 4
LRS = ["1e-3", "3e-3"]
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
    args = ["--quick", "--data", str(data), "--out-dir", str(out_dir), "--ckpt-dir", str(ckpt_dir)]
    args += ["--steps", str(STEPS), "--sweep-steps", str(SWEEP_STEPS), "--lrs", *LRS]
    calls: list[float] = []
    real_step = depth_study.train_step

    def counting_step(*a: object, **kw: object) -> tuple[float, float]:
        calls.append(1.0)
        return real_step(*a, **kw)

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(buf):
        mp.setattr(depth_study, "train_step", counting_step)
        depth_study.main(args)
    result = json.loads((out_dir / "depth_study.json").read_text())
    return {
        "data": data,
        "out": out_dir,
        "ckpt": ckpt_dir,
        "result": result,
        "steps_taken": len(calls),
        "stdout_last": buf.getvalue().strip().splitlines()[-1],
    }


def test_quick_run_writes_every_output(study: dict) -> None:
    out, result = study["out"], study["result"]
    for name in ("depth_study_loss.png", "depth_study_grad.png", "depth_study_depth.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "depth_study.md").read_text().startswith("# Depth study")
    assert result["complete"] is True
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
    assert summary["baseline"] == result["baseline"]


def test_every_step_is_training_trains_step(study: dict) -> None:
    """The study has no train step of its own: every step of every run (sweep, reported, diagnosis) is train_step."""
    result = study["result"]
    n_lrs = len(LRS)
    per_pair = n_lrs * SWEEP_STEPS + STEPS
    diagnosis = len(result["diagnosis"]) * n_lrs * SWEEP_STEPS
    assert study["steps_taken"] == len(result["runs"]) * per_pair + diagnosis
    assert diagnosis > 0


def test_each_run_uses_the_best_learning_rate_of_its_sweep(study: dict) -> None:
    for r in study["result"]["runs"]:
        assert [c["lr"] for c in r["sweep"]] == [float(x) for x in LRS]
        vals = {c["lr"]: c["val_loss"] for c in r["sweep"] if c["val_loss"] is not None}
        assert r["lr"] == min(vals, key=vals.get)
        assert study["result"]["train_config"]["warmup_steps"] >= 1


def test_checkpoints_load_with_their_stack_kind(study: dict) -> None:
    deepest = max(study["result"]["config"]["depths"])
    data_sha = hashlib.sha256(study["data"].read_bytes()).hexdigest()
    runs = {(r["depth"], r["kind"]): r for r in study["result"]["runs"]}
    _, val_split, _ = load_splits(study["data"])
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
        tc = TrainConfig(**ck.metadata["train_config"])
        assert tc.lr == run["lr"]
        # the reported val loss is this model's: recompute it from the saved weights
        assert estimate_loss(ck.model, val_split, tc, seed=tc.seed + 7) == pytest.approx(
            run["final_val_loss"], rel=1e-5
        )


def test_baseline_is_the_byte_frequency_cross_entropy(study: dict) -> None:
    train_split, val_split, _ = load_splits(study["data"])
    counts = [0] * 256
    for b in train_split.tolist():
        counts[b] += 1
    total = sum(counts) + 256
    want_val = -sum(math.log((counts[b] + 1) / total) for b in val_split.tolist()) / len(val_split)
    assert study["result"]["baseline"]["val"] == pytest.approx(want_val, rel=1e-9)
    md = (study["out"] / "depth_study.md").read_text()
    assert f"val {study['result']['baseline']['val']:.4f} nats/byte" in md


def _table_rows(md: str) -> dict[tuple[int, str], list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 7 and cells[0].isdigit():
            rows[(int(cells[0]), cells[1])] = cells[2:]
    return rows


def test_table_and_text_use_the_runs_numbers(study: dict) -> None:
    md = (study["out"] / "depth_study.md").read_text()
    rows = _table_rows(md)
    runs = study["result"]["runs"]
    assert set(rows) == {(r["depth"], r["kind"]) for r in runs}
    for r in runs:
        assert rows[(r["depth"], r["kind"])] == [
            f"{r['lr']:g}",
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


def test_render_only_rewrites_the_same_page(study: dict, tmp_path: Path) -> None:
    (tmp_path / "depth_study.json").write_text((study["out"] / "depth_study.json").read_text())
    with redirect_stdout(io.StringIO()):
        depth_study.main(["--render-only", "--out-dir", str(tmp_path)])
    assert (tmp_path / "depth_study.md").read_text() == (study["out"] / "depth_study.md").read_text()
    assert (tmp_path / "depth_study_depth.png").exists()


def _fake_result(train: dict[tuple[int, str], float], lr: float = 1e-3) -> dict:
    runs = [
        {
            "depth": d,
            "kind": k,
            "residual": k == "residual",
            "lr": lr,
            "final_train_loss": v,
            "final_val_loss": v + 0.01,
            "grad_ratio_init": 0.01 if k == "plain" else 1.2,
            "grad_ratio_end": 0.5,
        }
        for (d, k), v in train.items()
    ]
    return {
        "runs": runs,
        "config": {"steps": 100, "sweep_steps": 20, "lrs": [3e-4, 1e-3, 3e-3]},
        "baseline": {"train": 3.30, "val": 3.33},
    }


def test_findings_say_whether_degradation_was_reproduced() -> None:
    textbook = depth_study.findings(
        _fake_result(
            {(2, "plain"): 2.0, (2, "residual"): 2.0, (8, "plain"): 2.5, (8, "residual"): 1.9},
        )
    )
    assert any(s.startswith("Degradation reproduced") and "2.0000 at depth 2, 2.5000 at depth 8" in s for s in textbook)
    assert any(s.startswith("With the shortcut depth does not hurt training") for s in textbook)
    assert not any("does not match" in s for s in textbook)
    assert any("shrinks by 100x" in s for s in textbook)
    assert not any("edge of the swept grid" in s for s in textbook)
    broken = depth_study.findings(
        _fake_result({(2, "plain"): 2.5, (2, "residual"): 2.0, (32, "plain"): 2.1, (32, "residual"): 2.4}, lr=3e-3)
    )
    assert any(s.startswith("Degradation not reproduced") for s in broken)
    assert any("deepest model trains worse than the shallowest by 0.400 nats/byte" in s for s in broken)
    assert any("the plain stack is better by 0.300" in s for s in broken)
    assert any("edge of the swept grid" in s and "plain depth 2 (0.003)" in s for s in broken)


def test_findings_name_runs_stuck_at_the_baseline() -> None:
    result = _fake_result({(2, "plain"): 2.5, (2, "residual"): 2.0, (16, "plain"): 3.31, (16, "residual"): 1.9})
    for r in result["runs"]:
        flat = r["depth"] == 16 and r["kind"] == "plain"
        r["sweep"] = [{"lr": 1e-3, "val_loss": 3.34 if flat else 2.9}, {"lr": 3e-3, "val_loss": None}]
    out = depth_study.findings(result)
    stuck = [s for s in out if s.startswith("Within 0.05 nats/byte of the byte-frequency baseline")]
    assert len(stuck) == 1 and stuck[0].endswith("plain depth 16.")
    swept = [s for s in out if s.startswith("No swept learning rate")]
    assert len(swept) == 1 and "gets plain depth 16 more than" in swept[0]


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


def _self_attention_weight(model: Transformer, idx: torch.Tensor) -> float:
    """Mean attention probability a position gives itself in the first block (T > 1, so uniform < 1)."""
    block = model.blocks[0]
    with torch.no_grad():
        x = block.ln_1(model.wte(idx) + model.wpe(torch.arange(idx.shape[1])))  # (B, T, C)
        B, T, C = x.shape
        q, k, _ = block.attn.c_attn(x).view(B, T, 3, block.attn.n_head, block.attn.head_dim).unbind(2)
        att = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(block.attn.head_dim)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return att.diagonal(dim1=-2, dim2=-1)[..., 1:].mean().item()


def test_plain_stack_starts_attending_to_the_current_token() -> None:
    sc = depth_study.StudyConfig(d_model=64, block_size=32)
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    plain = depth_study.init_model(sc, 2, residual=False)
    usual = depth_study.init_model(sc, 2, residual=False, plain_qk_std=0.0)
    residual = depth_study.init_model(sc, 2, residual=True)
    for block in plain.blocks:
        w = block.attn.c_attn.weight
        assert torch.equal(w[:64], w[64:128]) and not torch.equal(w[:64], w[128:])
        assert w[:64].std().item() == pytest.approx(sc.plain_qk_std, rel=0.1)
    assert torch.equal(residual.blocks[0].attn.c_attn.weight, usual.blocks[0].attn.c_attn.weight)  # usual init
    assert _self_attention_weight(usual, idx) < 0.2  # near uniform over up to 32 positions
    assert _self_attention_weight(plain, idx) > 0.5
    # everything but the q/k rows is the usual initialisation
    for (name, p), q in zip(plain.named_parameters(), usual.parameters(), strict=True):
        if not name.endswith("c_attn.weight"):
            assert torch.equal(p, q), name


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


def test_best_lr_takes_the_lowest_finite_val_loss() -> None:
    cands = [{"lr": 1e-3, "val_loss": 2.5}, {"lr": 3e-3, "val_loss": None}, {"lr": 1e-2, "val_loss": 2.4}]
    assert depth_study.best_lr(cands) == 1e-2
    assert depth_study.best_lr([{"lr": 1e-3, "val_loss": None}, {"lr": 3e-3, "val_loss": None}]) == 1e-3


def test_default_study_is_the_specified_setup() -> None:
    sc = depth_study.StudyConfig()
    assert sc.depths == (2, 4, 8, 16, 32)
    assert len(sc.lrs) >= 3 and sc.sweep_steps < sc.steps
    mc = sc.model_config(32, residual=False)
    assert (mc.d_model, mc.n_head, mc.d_ff, mc.block_size, mc.residual) == (64, 4, 256, 64, False)
    assert sc.model_config(8, residual=True).residual is True
    for steps in (sc.steps, sc.sweep_steps):
        tc = sc.train_config(2e-3, steps)
        assert (tc.batch_size, tc.max_steps, tc.lr, tc.min_lr) == (16, steps, 2e-3, 2e-4)
        assert tc.warmup_steps == round(sc.warmup_frac * steps) > 0
        assert tc.grad_clip == TrainConfig().grad_clip


def test_too_short_data_fails_clearly(tmp_path: Path) -> None:
    short = tmp_path / "tiny.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        depth_study.run_study(short, tmp_path / "o", tmp_path / "c", depth_study.QUICK)


def test_flow_text_handles_a_gradient_that_underflows_to_zero() -> None:
    assert "vanishes" in depth_study._flow(0.0)
    assert "shrinks by 100x" in depth_study._flow(0.01)
