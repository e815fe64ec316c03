"""The tuned lens: its file (tied to a checkpoint's sha256, checked on load), its maths, and /diagnostics' and the
trace's tuned lens checked against translators applied by hand to the float64 reference forward's stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.diagnostics import DiagnosticsOptions, render_text, run_diagnostics, stream_trace
from model.lens import LensError, TunedLens, find_lens, lens_path, load_lens, save_lens
from model.tokenizer import encode
from model.transformer import Transformer
from tests.model.test_diagnostics import _build, _ln, _w, hand_forward

SHA = "ab" * 32
PROMPT = "Shortcut: x + F(x)!"


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _build(seed=3)


def random_lens(config: ModelConfig, seed: int = 0, scale: float = 0.2) -> TunedLens:
    """Translators far from the identity, so a lens applied at the wrong layer (or not at all) shows."""
    gen = torch.Generator().manual_seed(seed)
    L, C = config.n_layer, config.d_model
    return TunedLens(
        torch.randn(L - 1, C, C, generator=gen) * scale / C**0.5, torch.randn(L - 1, C, generator=gen) * scale
    )


def hand_translate(lens: TunedLens, layer: int, h: torch.Tensor) -> torch.Tensor:
    """h + A h + b in float64, one vector at a time; the last layer reads its stream as it is."""
    if layer == lens.n_layer - 1:
        return h
    A, b = lens.weight[layer].double(), lens.bias[layer].double()
    return h + torch.stack([A @ v for v in h.reshape(-1, h.shape[-1])]).view_as(h) + b


def hand_lens(model: Transformer, lens: TunedLens | None, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities (L, V) of each layer's lens at the last position, the final log-probabilities (V,))."""
    trace, logits = hand_forward(model, ids)
    rows = []
    for layer, t in enumerate(trace):
        h = t["resid_post"][-1]  # (C,)
        if lens is not None:
            h = hand_translate(lens, layer, h)
        rows.append(_ln(h, model.ln_f) @ _w(model.wte.weight).T)
    logq = torch.log_softmax(torch.stack(rows), dim=-1)  # (L, V)
    return logq, torch.log_softmax(logits[-1], dim=-1)


# ---------------------------------------------------------------- the file


def test_lens_file_round_trip_and_path(tmp_path: Path, model: Transformer) -> None:
    lens = random_lens(model.config)
    ck = tmp_path / "m.safetensors"
    assert lens_path(ck) == tmp_path / "m.lens.safetensors"
    assert find_lens(ck, model.config, SHA) is None  # no file: no lens
    save_lens(lens_path(ck), lens.weight, lens.bias, checkpoint_sha256=SHA, metadata={"steps": 3})
    got = find_lens(ck, model.config, SHA)
    assert got is not None and got.metadata == {"steps": 3}
    assert torch.equal(got.weight, lens.weight) and torch.equal(got.bias, lens.bias)


def test_a_lens_for_another_checkpoint_is_refused(tmp_path: Path, model: Transformer) -> None:
    lens = random_lens(model.config)
    path = tmp_path / "m.lens.safetensors"
    save_lens(path, lens.weight, lens.bias, checkpoint_sha256=SHA)
    with pytest.raises(LensError, match=r"trained for checkpoint sha256 abababababab.*retrain it"):
        load_lens(path, model.config, "cd" * 32)


@pytest.mark.parametrize("problem", ["shape", "nan", "format", "garbage"])
def test_a_broken_lens_file_is_refused(tmp_path: Path, model: Transformer, problem: str) -> None:
    from safetensors.torch import save_file

    lens = random_lens(model.config)
    path = tmp_path / "m.lens.safetensors"
    header = {"format": "shortcut-lens/1", "checkpoint_sha256": SHA, "metadata": "{}"}
    weight, bias = lens.weight.clone(), lens.bias.clone()
    if problem == "shape":
        weight = weight[:-1]
    if problem == "nan":
        bias[1, 2] = float("nan")
    if problem == "format":
        header["format"] = "shortcut-lm/1"
    save_file({"weight": weight, "bias": bias}, str(path), metadata=header)
    if problem == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    message = {"shape": "has shape", "nan": "NaN", "format": "not a tuned-lens file", "garbage": "not a safetensors"}
    with pytest.raises(LensError, match=message[problem]):
        load_lens(path, model.config, SHA)


# ---------------------------------------------------------------- the maths


def test_apply_all_is_apply_layer_by_layer_and_zero_is_the_logit_lens(model: Transformer) -> None:
    lens = random_lens(model.config)
    stream = torch.randn(model.config.n_layer, 3, 5, model.config.d_model)
    together = lens.apply_all(stream)
    for layer in range(model.config.n_layer):
        want = hand_translate(lens, layer, stream[layer].double()).float()
        torch.testing.assert_close(together[layer], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lens.apply(layer, stream[layer]), want, rtol=1e-5, atol=1e-5)
    zero = TunedLens(torch.zeros_like(lens.weight), torch.zeros_like(lens.bias))
    assert torch.equal(zero.apply_all(stream), stream)


# ---------------------------------------------------------------- /diagnostics' tuned lens and the trace


def test_diagnostics_tuned_lens_equals_the_hand_computation(model: Transformer) -> None:
    ids = encode(PROMPT)
    lens = random_lens(model.config)
    result = run_diagnostics(model, ids, DiagnosticsOptions(logit_lens=4, tuned_lens=4), lens=lens)
    for key, which in (("tuned_lens", lens), ("logit_lens", None)):
        logq, logp = hand_lens(model, which, ids)
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)  # (L,)
        entropy = -(logq.exp() * logq).sum(-1)
        top = logq.exp().topk(4, dim=-1)
        for layer, entry in enumerate(result["layers"]):
            got = entry[key]
            assert got["kl_to_final"] == pytest.approx(kl[layer].item(), rel=2e-4, abs=1e-5), (key, layer)
            assert got["entropy"] == pytest.approx(entropy[layer].item(), rel=2e-4), (key, layer)
            assert [t["id"] for t in got["top"]] == top.indices[layer].tolist(), (key, layer)
            assert [t["prob"] for t in got["top"]] == pytest.approx(top.values[layer].tolist(), rel=2e-4, abs=1e-6)
    tuned = [e["tuned_lens"]["kl_to_final"] for e in result["layers"]]
    logit = [e["logit_lens"]["kl_to_final"] for e in result["layers"]]
    assert tuned[-1] == logit[-1] == 0  # the last layer is the final distribution, through either lens
    assert tuned[:-1] != pytest.approx(logit[:-1], rel=1e-3)  # the random translators change every other layer
    assert json.loads(json.dumps(result))["options"]["tuned_lens"] == 4


def test_tuned_lens_without_a_lens_is_refused(model: Transformer) -> None:
    with pytest.raises(ValueError, match=r"training\.tuned_lens"):
        run_diagnostics(model, encode("ab"), DiagnosticsOptions(tuned_lens=2))
    wrong = random_lens(_build(n_layer=3).config)
    with pytest.raises(ValueError, match="reads 3 layers"):
        run_diagnostics(model, encode("ab"), DiagnosticsOptions(tuned_lens=2), lens=wrong)


def test_text_report_shows_both_kl_columns(model: Transformer) -> None:
    opts = DiagnosticsOptions(logit_lens=1, tuned_lens=1)
    result = run_diagnostics(model, encode(PROMPT), opts, lens=random_lens(model.config))
    lines = render_text(result).splitlines()
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if line.split()[:1] == ["layer"])
    rows = lines[lines.index(header) + 1 :][: model.config.n_layer]
    for name, key in (("KL log", "logit_lens"), ("KL tun", "tuned_lens")):
        start = header.index(name)  # cells are right-aligned under their 6-wide name
        for row, entry in zip(rows, result["layers"], strict=True):
            want = entry[key]["kl_to_final"]
            assert float(row[start : start + 6]) == pytest.approx(want, rel=1e-3, abs=1e-4), (name, row)


def test_trace_reads_each_rows_own_lens(model: Transformer) -> None:
    """Rows of one batch may ask for different lenses: each row's tokens are its own lens's, by hand."""
    lens = random_lens(model.config)
    prompts = [encode("Shortcut"), encode("residual")]
    traces = [hand_forward(model, p)[0] for p in prompts]
    stream = torch.stack(
        [torch.stack([t[0]["resid_pre"][-1]] + [x["resid_post"][-1] for x in t]) for t in traces], dim=1
    ).float()  # (L + 1, R, C)
    rows = stream_trace(model, stream, [3, 2], ["tuned", "logit"], lens)
    for r, (row, which) in enumerate(zip(rows, (lens, None), strict=True)):
        assert row["lens"] == ("tuned" if which is not None else "logit")
        for layer, tops in enumerate(row["logit_lens"]):
            h = traces[r][layer]["resid_post"][-1]
            if which is not None:
                h = hand_translate(which, layer, h)
            probs = torch.softmax(_ln(h, model.ln_f) @ _w(model.wte.weight).T, dim=-1)
            want = probs.topk(len(tops))
            assert [t["id"] for t in tops] == want.indices.tolist(), (r, layer)
            assert [t["prob"] for t in tops] == pytest.approx(want.values.tolist(), rel=2e-4, abs=1e-6)
    with pytest.raises(ValueError, match="TunedLens"):
        stream_trace(model, stream, [1, 1], ["tuned", "logit"], None)
