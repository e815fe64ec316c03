"""Diagnostics checked against a hand-written float64 forward of the same tiny model."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.diagnostics import (
    EPS,
    DiagnosticsOptions,
    iter_diagnostics,
    render_text,
    residual_norms_last,
    run_diagnostics,
    spearman,
)
from model.tokenizer import encode, token_text
from model.transformer import RESID_NAMES, Transformer
from tests.helpers import run_job

SNAPSHOTS = Path(__file__).parent / "snapshots"
CFG = dict(block_size=32, n_layer=4, n_head=4, d_model=32, d_ff=64)
PROMPT = "Shortcut: x + F(x)!"
REL, ABS = 2e-4, 1e-6


def _build(seed: int = 0, scale: float | None = 0.3, **overrides: object) -> Transformer:
    """Seeded tiny model in eval mode; with `scale`, weights are redrawn large so every part matters."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**CFG, **overrides}))
    if scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0.0, scale)
                if "ln_" in name and name.endswith("weight"):
                    p.add_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def diag_model() -> Transformer:
    return _build()


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return encode(PROMPT)


# ---------------------------------------------------------------- independent float64 reference


def _w(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double()


def _ln(x: torch.Tensor, mod: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + mod.eps) * _w(mod.weight)
    return y + _w(mod.bias) if mod.bias is not None else y


def _lin(x: torch.Tensor, mod: torch.nn.Linear) -> torch.Tensor:
    y = x @ _w(mod.weight).T
    return y + _w(mod.bias) if mod.bias is not None else y


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _attention(blk: torch.nn.Module, h: torch.Tensor, n_head: int) -> torch.Tensor:
    T, C = h.shape
    hd = C // n_head
    q, k, v = _lin(h, blk.attn.c_attn).split(C, dim=-1)  # each (T, C)
    q, k, v = (t.view(T, n_head, hd).transpose(0, 1) for t in (q, k, v))  # (nh, T, hd)
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)  # (nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    att = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    y = (att @ v).transpose(0, 1).reshape(T, C)  # (T, C)
    return _lin(y, blk.attn.c_proj)


def hand_forward(
    model: Transformer, ids: list[int], skip: tuple[int, str] | None = None, leaf: bool = False
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Residual stream (per layer, each (T, C)) and logits (T, V), in float64, optionally with a part skipped."""
    cfg = model.config
    T = len(ids)
    x = _w(model.wte.weight)[ids] + _w(model.wpe.weight)[:T]  # (T, C)
    if leaf:
        x.requires_grad_(True)
    trace = []
    for layer, blk in enumerate(model.blocks):
        off = skip[1] if skip is not None and skip[0] == layer else None
        pre = x
        attn = torch.zeros_like(pre) if off in ("block", "attn") else _attention(blk, _ln(pre, blk.ln_1), cfg.n_head)
        mid = (pre + attn if cfg.residual else attn) if off not in ("block", "attn") else pre
        if off in ("block", "mlp"):
            mlp, post = torch.zeros_like(mid), mid
        else:
            mlp = _lin(_gelu_tanh(_lin(_ln(mid, blk.ln_2), blk.mlp.c_fc)), blk.mlp.c_proj)
            post = mid + mlp if cfg.residual else mlp
        trace.append(dict(resid_pre=pre, attn_out=attn, resid_mid=mid, mlp_out=mlp, resid_post=post))
        x = post
    logits = _ln(x, model.ln_f) @ _w(model.wte.weight).T  # (T, V)
    return trace, logits


def hand_loss(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    logp = logits[:-1] - torch.logsumexp(logits[:-1], dim=-1, keepdim=True)  # (T-1, V)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()


def norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=-1)


def close(a: float, b: float | torch.Tensor, rel: float = REL, abs_: float = ABS) -> bool:
    return a == pytest.approx(float(b), rel=rel, abs=abs_)


def hand_ranks(xs: list[float]) -> list[float]:
    """Average ranks by counting: #smaller + (#equal + 1) / 2."""
    return [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]


def floats(obj: object) -> list[float]:
    if isinstance(obj, float):
        return [obj]
    if isinstance(obj, dict):
        return [f for v in obj.values() for f in floats(v)]
    if isinstance(obj, list):
        return [f for v in obj for f in floats(v)]
    return []


# ---------------------------------------------------------------- tests


def test_hand_forward_matches_model(diag_model: Transformer, ids: list[int]) -> None:
    _, logits = hand_forward(diag_model, ids)
    with torch.no_grad():
        model_logits = diag_model(torch.tensor([ids])).logits[0].double()
    torch.testing.assert_close(model_logits, logits, rtol=1e-4, atol=1e-4)


def test_norms_ratios_and_cosines_match_reference(diag_model: Transformer, ids: list[int]) -> None:
    result = run_diagnostics(diag_model, ids, DiagnosticsOptions(per_token=True))
    trace, logits = hand_forward(diag_model, ids)
    assert result["n_tokens"] == len(ids)
    assert result["tokens"]["ids"] == ids
    assert "".join(result["tokens"]["text"]) == PROMPT
    assert result["tokens"]["text"] == [token_text(i) for i in ids]
    assert close(result["loss"], hand_loss(logits, ids))
    assert len(result["layers"]) == CFG["n_layer"]
    for layer, (got, ref) in enumerate(zip(result["layers"], trace, strict=True)):
        assert got["layer"] == layer
        for name in RESID_NAMES:
            n = norm(ref[name])  # (T,)
            assert close(got[name]["mean"], n.mean()), (layer, name)
            assert close(got[name]["max"], n.max()), (layer, name)
            assert close(got[name]["first"], n[0]), (layer, name)
            assert got[name]["per_token"] == pytest.approx(n.tolist(), rel=REL, abs=ABS)
        pre, post = ref["resid_pre"], ref["resid_post"]
        update = post - pre
        ratios = got["update_ratio"]
        assert close(ratios["attn"], (norm(ref["attn_out"]) / norm(pre)).mean())
        assert close(ratios["mlp"], (norm(ref["mlp_out"]) / norm(ref["resid_mid"])).mean())
        assert close(ratios["block"], (norm(update) / norm(pre)).mean())
        cos_update = ((pre * update).sum(-1) / (norm(pre) * norm(update))).mean()
        cos_post = ((pre * post).sum(-1) / (norm(pre) * norm(post))).mean()
        assert close(got["cos_update"], cos_update, abs_=1e-5)
        assert close(got["block_influence"], 1 - cos_post, abs_=1e-5)
        for absent in ("logit_lens", "grad_norm", "delta_loss"):
            assert absent not in got
    growth = (norm(trace[-1]["resid_post"]).mean() / norm(trace[0]["resid_pre"]).mean()) ** (1 / CFG["n_layer"])
    assert close(result["summary"]["norm_growth_per_layer"], growth)
    blocks = [float((norm(r["resid_post"] - r["resid_pre"]) / norm(r["resid_pre"])).mean()) for r in trace]
    assert result["summary"]["largest_update_layer"] == blocks.index(max(blocks))
    assert "spearman_bi_vs_delta_loss" not in result["summary"]


def test_per_token_absent_by_default_and_identities(diag_model: Transformer, ids: list[int]) -> None:
    layers = run_diagnostics(diag_model, ids, DiagnosticsOptions(per_token=True))["layers"]
    for before, after in itertools.pairwise(layers):
        assert after["resid_pre"] == before["resid_post"]  # the same tensor: exactly equal after rounding
    plain = run_diagnostics(diag_model, ids, DiagnosticsOptions())["layers"]
    assert all("per_token" not in e[name] for e in plain for name in RESID_NAMES)
    assert plain[0]["resid_post"]["mean"] == layers[0]["resid_post"]["mean"]


def test_logit_lens_matches_reference(diag_model: Transformer, ids: list[int]) -> None:
    k = 5
    result = run_diagnostics(diag_model, ids, DiagnosticsOptions(logit_lens=k))
    trace, logits = hand_forward(diag_model, ids)
    logp = torch.log_softmax(logits[-1], dim=-1)  # final distribution at the last position
    p = logp.exp()
    for got, ref in zip(result["layers"], trace, strict=True):
        lens = got["logit_lens"]
        q_logits = _ln(ref["resid_post"][-1], diag_model.ln_f) @ _w(diag_model.wte.weight).T  # (V,)
        logq = torch.log_softmax(q_logits, dim=-1)
        q = logq.exp()
        order = torch.sort(q, descending=True).indices[:k].tolist()
        assert [t["id"] for t in lens["top"]] == order
        assert [t["text"] for t in lens["top"]] == [token_text(i) for i in order]
        assert [t["prob"] for t in lens["top"]] == pytest.approx(q[order].tolist(), rel=REL, abs=ABS)
        assert close(lens["entropy"], -(q * logq).sum())
        assert close(lens["kl_to_final"], (p * (logp - logq)).sum(), abs_=1e-5)
    assert result["layers"][-1]["logit_lens"]["kl_to_final"] == pytest.approx(0.0, abs=1e-5)
    assert result["layers"][-1]["logit_lens"]["top"][0]["id"] == int(logits[-1].argmax())


def test_logit_lens_whole_vocabulary(diag_model: Transformer, ids: list[int]) -> None:
    lens = run_diagnostics(diag_model, ids, DiagnosticsOptions(logit_lens=256))["layers"][0]["logit_lens"]
    assert sorted(t["id"] for t in lens["top"]) == list(range(256))
    assert sum(t["prob"] for t in lens["top"]) == pytest.approx(1.0, abs=1e-4)


def test_gradients_match_autograd_on_reference(diag_model: Transformer, ids: list[int]) -> None:
    result = run_diagnostics(diag_model, ids, DiagnosticsOptions(gradients=True))
    trace, logits = hand_forward(diag_model, ids, leaf=True)
    pre = [r["resid_pre"] for r in trace]
    grads = torch.autograd.grad(hand_loss(logits, ids), pre)
    for got, g in zip(result["layers"], grads, strict=True):
        assert close(got["grad_norm"], norm(g).mean(), rel=1e-3)
    assert all(p.grad is None for p in diag_model.parameters())
    assert not diag_model.training


def test_gradients_work_inside_callers_inference_mode(diag_model: Transformer, ids: list[int]) -> None:
    expected = run_diagnostics(diag_model, ids, DiagnosticsOptions(gradients=True))
    with torch.inference_mode():
        got = run_diagnostics(diag_model, ids, DiagnosticsOptions(gradients=True))
    assert [e["grad_norm"] for e in got["layers"]] == [e["grad_norm"] for e in expected["layers"]]


def test_gradients_need_parameters_that_carry_a_graph(ids: list[int]) -> None:
    frozen = _build().requires_grad_(False)
    with pytest.raises(ValueError, match="require grad"):
        run_diagnostics(frozen, ids, DiagnosticsOptions(gradients=True))


def test_single_token_skips_loss_gradients_and_ablation(diag_model: Transformer) -> None:
    result = run_diagnostics(diag_model, [65], DiagnosticsOptions(gradients=True, ablation=True, logit_lens=2))
    assert result["loss"] is None
    assert all(e["grad_norm"] is None and e["delta_loss"] is None for e in result["layers"])
    assert result["summary"]["spearman_bi_vs_delta_loss"] is None
    assert any("at least 2 tokens" in note for note in result["notes"])
    assert result["layers"][0]["resid_pre"]["mean"] > 0
    trace, _ = hand_forward(diag_model, [65])
    assert close(result["layers"][1]["resid_post"]["first"], norm(trace[1]["resid_post"][0]))


def test_ablation_matches_skipped_reference_and_spearman(diag_model: Transformer, ids: list[int]) -> None:
    result = run_diagnostics(diag_model, ids, DiagnosticsOptions(ablation=True))
    _, logits = hand_forward(diag_model, ids)
    clean = hand_loss(logits, ids)
    for layer, got in enumerate(result["layers"]):
        assert set(got["delta_loss"]) == {"block", "attn", "mlp"}
        for part in ("block", "attn", "mlp"):
            _, ablated = hand_forward(diag_model, ids, skip=(layer, part))
            assert close(got["delta_loss"][part], hand_loss(ablated, ids) - clean, rel=1e-3, abs_=1e-5), (layer, part)
    bi = [e["block_influence"] for e in result["layers"]]
    dl = [e["delta_loss"]["block"] for e in result["layers"]]
    rho = torch.corrcoef(torch.tensor([hand_ranks(bi), hand_ranks(dl)], dtype=torch.float64))[0, 1]
    assert close(result["summary"]["spearman_bi_vs_delta_loss"], rho, abs_=1e-6)


def test_ablation_runs_one_forward_per_part_and_norms_one_in_total(diag_model: Transformer, ids: list[int]) -> None:
    calls = []  # the embedding runs once per forward (whole or a block at a time)
    handle = diag_model.wte.register_forward_hook(lambda *_: calls.append(1))
    try:
        run_diagnostics(diag_model, ids, DiagnosticsOptions(per_token=True, logit_lens=3))
        assert len(calls) == 1
        calls.clear()
        run_diagnostics(diag_model, ids, DiagnosticsOptions(gradients=True))
        assert len(calls) == 1
        calls.clear()
        run_diagnostics(diag_model, ids, DiagnosticsOptions(ablation=True))
        assert len(calls) == 1 + 3 * CFG["n_layer"]
    finally:
        handle.remove()


def test_every_forward_is_sliced_per_block_and_other_forwards_between_change_nothing(
    diag_model: Transformer, ids: list[int]
) -> None:
    """A job slice is one block of a forward (or of the backward): with gradients and ablation, at least n_layer yields
    per forward (1 + 3 n_layer of them) plus one per block of the backward; and a decode-like forward of another
    prompt run between every two slices leaves the result as one uninterrupted run gives it."""
    opts = DiagnosticsOptions(gradients=True, ablation=True, logit_lens=2, per_token=True)
    expected = run_diagnostics(diag_model, ids, opts)
    other = torch.tensor([[7, 8, 9]])

    def forward() -> None:
        with torch.inference_mode():
            diag_model(other, return_resid=True)

    got, slices = run_job(iter_diagnostics(diag_model, ids, opts), forward)
    L = CFG["n_layer"]
    assert slices >= L * (1 + 3 * L) + L
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        ([1, 2, 3], [1, 3, 2], 0.5),  # 1 - 6 * 2 / (3 * 8)
        ([1, 2, 3, 4], [40, 30, 20, 10], -1.0),
        ([1, 2, 2, 3], [1, 2, 3, 4], 4.5 / math.sqrt(4.5 * 5.0)),  # ranks x = 1, 2.5, 2.5, 4
        ([3.0, 1.0, 2.0, 2.0], [0.3, 0.1, 0.2, 0.2], 1.0),
        ([1, 1, 1], [1, 2, 3], None),
        ([1, 2, 3], [7, 7, 7], None),
        ([1], [2], None),
    ],
)
def test_spearman_known_values(x: list[float], y: list[float], expected: float | None) -> None:
    got = spearman(x, y)
    assert got == (pytest.approx(expected, abs=1e-12) if expected is not None else None)


def test_spearman_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_zero_model_gives_finite_json() -> None:
    model = _build(scale=None)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = run_diagnostics(model, encode("abc"), DiagnosticsOptions(logit_lens=3, gradients=True, ablation=True))
    json.dumps(result, allow_nan=False)
    for e in result["layers"]:
        assert e["update_ratio"] == {"attn": 0.0, "mlp": 0.0, "block": 0.0}
        assert e["cos_update"] == 0.0 and e["block_influence"] == 1.0
        assert e["logit_lens"]["entropy"] == pytest.approx(math.log(256), rel=1e-5)
    assert result["loss"] == pytest.approx(math.log(256), rel=1e-5)
    assert result["summary"]["norm_growth_per_layer"] == 0.0


def test_zero_denominator_ratio_is_numerator_over_eps() -> None:
    model = _build()
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wpe.weight.zero_()  # resid_pre of layer 0 is exactly zero
    result = run_diagnostics(model, encode("ab"), DiagnosticsOptions())
    json.dumps(result, allow_nan=False)
    trace, _ = hand_forward(model, encode("ab"))
    layer0 = result["layers"][0]
    assert close(layer0["update_ratio"]["attn"], (norm(trace[0]["attn_out"]) / EPS).mean())
    assert layer0["cos_update"] == 0.0 and layer0["block_influence"] == 1.0


def test_plain_stack_without_shortcut(ids: list[int]) -> None:
    model = _build(residual=False)
    result = run_diagnostics(model, ids, DiagnosticsOptions())
    trace, _ = hand_forward(model, ids)
    for got, ref in zip(result["layers"], trace, strict=True):
        assert close(got["resid_post"]["mean"], norm(ref["mlp_out"]).mean())
        assert got["resid_post"] == got["mlp_out"] and got["resid_mid"] == got["attn_out"]


def test_result_is_rounded_json(diag_model: Transformer, ids: list[int]) -> None:
    opts = DiagnosticsOptions(per_token=True, logit_lens=3, gradients=True, ablation=True)
    result = run_diagnostics(diag_model, ids, opts, model_info={"name": "tiny"})
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["model"] == {"name": "tiny"}
    assert result["options"] == {
        "per_token": True,
        "logit_lens": 3,
        "tuned_lens": 0,
        "gradients": True,
        "ablation": True,
        "intervention": None,
    }
    values = floats(result)
    assert len(values) > 100
    assert all(float(f"{v:.6g}") == v for v in values)


def test_residual_norms_last_matches_reference(diag_model: Transformer) -> None:
    rows = [encode("hello world!"), encode("Fx + x = out")]
    with torch.no_grad():
        out = diag_model(torch.tensor(rows), return_resid=True)
    for b, row in enumerate(rows):
        trace, _ = hand_forward(diag_model, row)
        got = residual_norms_last(out.resid, row=b)
        assert got == pytest.approx([float(norm(r["resid_post"][-1])) for r in trace], rel=REL)
        got3 = residual_norms_last(out.resid, row=b, position=3)
        assert got3 == pytest.approx([float(norm(r["resid_post"][3])) for r in trace], rel=REL)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(logit_lens=-1),
        dict(logit_lens=True),
        dict(logit_lens=2.0),
        dict(per_token=1),
        dict(gradients="yes"),
        dict(ablation=None),
    ],
)
def test_option_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DiagnosticsOptions(**kwargs)


def test_logit_lens_bounded_by_vocabulary(diag_model: Transformer, ids: list[int]) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        run_diagnostics(diag_model, ids, DiagnosticsOptions(logit_lens=257))


@pytest.mark.parametrize("bad", [[], list(range(33)), [256], [-1], [1, "a"], [True], "abc"])
def test_token_validation(diag_model: Transformer, bad: object) -> None:
    with pytest.raises(ValueError):
        run_diagnostics(diag_model, bad, DiagnosticsOptions())  # type: ignore[arg-type]


def test_training_mode_with_dropout_is_refused(ids: list[int]) -> None:
    model = _build(dropout=0.1).train()
    with pytest.raises(ValueError, match="eval"):
        run_diagnostics(model, ids, DiagnosticsOptions())


# ---------------------------------------------------------------- text report


def _check_layout(text: str, n_layer: int, width: int = 80) -> list[str]:
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    assert lines[0].startswith("diagnostics: ")
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    rows = lines[header + 1 : header + 1 + n_layer]
    assert [int(r.split()[0].rstrip("*")) for r in rows] == list(range(n_layer))
    assert lines[header + 1 + n_layer] == ""
    return rows


def test_render_text_snapshot(diag_model: Transformer, ids: list[int]) -> None:
    opts = DiagnosticsOptions(per_token=True, logit_lens=3, gradients=True, ablation=True)
    text = render_text(run_diagnostics(diag_model, ids, opts))
    rows = _check_layout(text, CFG["n_layer"])
    assert all(r[-1] in "█▏▎▍▌▋▊▉" for r in rows)
    path = SNAPSHOTS / "diagnostics_report.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def test_render_text_bar_is_scaled_to_the_largest_update(diag_model: Transformer, ids: list[int]) -> None:
    result = run_diagnostics(diag_model, ids, DiagnosticsOptions())
    rows = _check_layout(render_text(result), CFG["n_layer"])
    bars = [len(r.split()[-1]) for r in rows]
    largest = result["summary"]["largest_update_layer"]
    assert bars[largest] == max(bars) and len(rows[largest]) == 80
    blocks = [e["update_ratio"]["block"] for e in result["layers"]]
    for row, value in zip(rows, blocks, strict=True):
        cells = row.split()[-1]
        eighths = 8 * cells.count("█") + (" ▏▎▍▌▋▊▉".index(cells[-1]) if cells[-1] != "█" else 0)
        assert eighths == round(8 * bars[largest] * value / max(blocks))


@pytest.mark.parametrize(
    ("per_token", "logit_lens", "gradients", "ablation", "prompt"),
    list(itertools.product([False, True], [0, 2], [False, True], [False, True], ["a", "\n\t\x00é€"])),
)
def test_render_text_every_option_combination(
    diag_model: Transformer, per_token: bool, logit_lens: int, gradients: bool, ablation: bool, prompt: str
) -> None:
    opts = DiagnosticsOptions(per_token=per_token, logit_lens=logit_lens, gradients=gradients, ablation=ablation)
    result = run_diagnostics(diag_model, encode(prompt), opts)
    text = render_text(result)
    rows = _check_layout(text, CFG["n_layer"])
    header = next(line for line in text.splitlines() if line.split()[:1] == ["layer"]).split()
    assert ("grad" in header) == gradients
    assert ("blk" in header) == ablation
    # the logit lens shows as its KL column, and its top-1 column where the line has room for it
    assert ("KL" in header) == (logit_lens > 0) and ("lens" in header) <= (logit_lens > 0)
    assert all(line.isprintable() for line in text.splitlines())
    assert ("spearman" in text) == ablation
    assert ("at least 2 tokens" in text) == (len(encode(prompt)) < 2 and (gradients or ablation))
    if gradients and len(encode(prompt)) < 2:
        assert all(r.split()[6] == "-" for r in rows)


def test_render_text_narrow_width(diag_model: Transformer, ids: list[int]) -> None:
    result = run_diagnostics(diag_model, ids, DiagnosticsOptions(logit_lens=1, gradients=True, ablation=True))
    for width in (40, 60, 120):
        lines = render_text(result, width=width).splitlines()
        assert all(len(line) <= width for line in lines)
