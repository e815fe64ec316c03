"""The tuned lens through HTTP: /diagnostics' `tuned_lens` and the trace's `lens: "tuned"` against translators applied
by hand to the float64 reference forward's stream; the 400 of a model without a lens; a lens is not a model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.schemas import DiagnosticsResponse
from app.service import checkpoint_paths
from model import tokenizer
from model.checkpoint import load_checkpoint, save_checkpoint
from model.lens import lens_path, save_lens
from tests.conftest import APP_CONFIG, app_settings, build_model
from tests.helpers import assert_error
from tests.model.test_diagnostics import _ln, _w, hand_forward
from tests.model.test_lens import hand_lens, hand_translate, random_lens

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def lens_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint (APP_CONFIG) with random translators beside it."""
    path = tmp_path_factory.mktemp("lens") / "tiny.safetensors"
    sha = save_checkpoint(build_model(APP_CONFIG, seed=4), path)
    lens = random_lens(APP_CONFIG, seed=5, scale=0.5)
    save_lens(lens_path(path), lens.weight, lens.bias, checkpoint_sha256=sha)
    return path


@pytest.fixture
def with_lens(make_client: Callable[..., TestClient], lens_checkpoint: Path) -> TestClient:
    return make_client(lens_checkpoint, decode_weights="float32")


def test_diagnostics_tuned_lens_equals_the_hand_computation(with_lens: TestClient, lens_checkpoint: Path) -> None:
    r = with_lens.post("/diagnostics", json={"prompt": PROMPT, "tuned_lens": 3, "logit_lens": 3})
    assert r.status_code == 200, r.text
    ck = load_checkpoint(lens_checkpoint)
    lens = random_lens(APP_CONFIG, seed=5, scale=0.5)
    logq, logp = hand_lens(ck.model, lens, tokenizer.encode(PROMPT))
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)
    top = logq.exp().topk(3, dim=-1)
    DiagnosticsResponse.model_validate(r.json())  # the documented schema has the tuned_lens block
    layers = r.json()["layers"]
    for layer, entry in enumerate(layers):
        got = entry["tuned_lens"]
        assert got["kl_to_final"] == pytest.approx(kl[layer].item(), rel=2e-4, abs=1e-5)
        assert [t["id"] for t in got["top"]] == top.indices[layer].tolist()
        assert [t["prob"] for t in got["top"]] == pytest.approx(top.values[layer].tolist(), rel=2e-4, abs=1e-6)
    assert layers[0]["tuned_lens"]["kl_to_final"] != pytest.approx(layers[0]["logit_lens"]["kl_to_final"], rel=1e-3)
    text = with_lens.get("/diagnostics", params={"prompt": PROMPT, "tuned_lens": 1, "logit_lens": 1, "format": "text"})
    assert "KL log" in text.text and "KL tun" in text.text


@torch.no_grad()
def test_generate_trace_through_the_tuned_lens(with_lens: TestClient, lens_checkpoint: Path) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 3, "logprobs": 1, "logit_lens_top": 2, "lens": "tuned"}
    out = with_lens.post("/generate", json=body)
    assert out.status_code == 200, out.text
    model = load_checkpoint(lens_checkpoint).model
    lens = random_lens(APP_CONFIG, seed=5, scale=0.5)
    ids = tokenizer.encode(PROMPT) + [t["id"] for t in out.json()["tokens"]]
    for tok in out.json()["trace"]["tokens"]:
        assert tok["lens"] == "tuned"
        trace, _ = hand_forward(model, ids[: tok["position"] + 1])
        for layer, tops in enumerate(tok["logit_lens"]):
            h = hand_translate(lens, layer, trace[layer]["resid_post"][-1])
            want = torch.softmax(_ln(h, model.ln_f) @ _w(model.wte.weight).T, -1).topk(2)
            assert [t["id"] for t in tops] == want.indices.tolist(), (tok["position"], layer)
            assert [t["prob"] for t in tops] == pytest.approx(want.values.tolist(), rel=1e-4, abs=1e-6)


def test_a_model_without_a_lens_says_how_to_train_one(client: TestClient) -> None:
    r = client.post("/diagnostics", json={"prompt": PROMPT, "tuned_lens": 2})
    err = assert_error(r, 400, code="invalid_value", param="tuned_lens")
    assert "python -m training.tuned_lens --checkpoint" in err["message"] and "tiny.lens.safetensors" in err["message"]
    body = {"prompt": PROMPT, "max_new_tokens": 1, "logit_lens_top": 1, "lens": "tuned"}
    err = assert_error(client.post("/generate", json=body), 400, param="lens")
    assert "python -m training.tuned_lens" in err["message"]
    v1 = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "logit_lens_top": 1, "lens": "tuned"}
    assert_error(client.post("/v1/completions", json=v1), 400, param="lens")
    assert client.post("/generate", json={**body, "lens": "logit"}).status_code == 200
    assert_error(client.post("/generate", json={**body, "lens": "tuning"}), 422)


def test_a_lens_file_is_not_served_as_a_model(lens_checkpoint: Path) -> None:
    paths = checkpoint_paths(app_settings(lens_checkpoint, extra_checkpoints_dir=lens_checkpoint.parent))
    assert paths == {"tiny": lens_checkpoint}
