"""POST /hidden_states and POST /patching over HTTP: values against an independent hooked forward of the same
checkpoint, the documented base64 layout (decoded with numpy), safetensors, /diagnostics's norms, caps and 400s."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load

from model import tokenizer
from model.checkpoint import load_checkpoint
from model.transformer import RESID_NAMES, Transformer
from tests.helpers import assert_error, parse_metrics, value
from tests.model.test_readout import hooked_acts, hooked_patch

PROMPTS = ["Once upon a time", "Hi there"]  # ragged: 16 and 8 tokens
N_LAYER, D_MODEL = 2, 16  # APP_CONFIG


@pytest.fixture
def model(app_checkpoint: Path) -> Transformer:
    return load_checkpoint(app_checkpoint).model.eval()


def expected(model: Transformer, text: str, layers: list[int], sites: list[str], positions: list[int]) -> np.ndarray:
    """(layers, sites, positions, d_model) from module hooks on the checkpoint itself."""
    acts, _ = hooked_acts(model, tokenizer.encode(text))
    return np.stack([np.stack([acts[s][l][positions].numpy() for s in sites]) for l in layers])


def test_lists_equal_a_hooked_forward_for_ragged_prompts(client: TestClient, model: Transformer) -> None:
    resp = client.post("/hidden_states", json={"prompts": PROMPTS, "sites": list(RESID_NAMES)})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["shape"] == [2, N_LAYER, 5, None, D_MODEL]
    assert body["positions"] == [list(range(16)), list(range(8))]
    assert body["tokens"][1]["ids"] == tokenizer.encode(PROMPTS[1])
    for i, text in enumerate(PROMPTS):
        want = expected(model, text, [0, 1], list(RESID_NAMES), body["positions"][i])
        np.testing.assert_allclose(np.array(body["data"][i]), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_base64_is_the_documented_little_endian_c_order_layout(
    client: TestClient, model: Transformer, dtype: str
) -> None:
    body = {"prompts": PROMPTS, "layers": [1, 0], "sites": ["mlp_out", "resid_pre"], "positions": [0, -1]}
    resp = client.post("/hidden_states", json={**body, "encoding": "base64", "dtype": dtype})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["shape"] == [2, 2, 2, 2, D_MODEL] and out["layers"] == [1, 0]
    assert out["positions"] == [[0, 15], [0, 7]]
    flat = np.frombuffer(base64.b64decode(out["data"]), dtype="<f4" if dtype == "float32" else "<f2")
    got = flat.reshape(out["shape"])  # equal positions: one C-order array
    for i, text in enumerate(PROMPTS):
        want = expected(model, text, [1, 0], ["mlp_out", "resid_pre"], out["positions"][i])
        if dtype == "float16":
            np.testing.assert_array_equal(got[i], want.astype("<f2"))
        else:
            np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=1e-5)


def test_base64_of_ragged_prompts_is_each_prompts_array_in_turn(client: TestClient, model: Transformer) -> None:
    resp = client.post("/hidden_states", json={"prompts": PROMPTS, "layers": [1], "encoding": "base64"})
    out = resp.json()
    flat = np.frombuffer(base64.b64decode(out["data"]), dtype="<f4")
    assert flat.size == (16 + 8) * D_MODEL
    first, second = flat[: 16 * D_MODEL].reshape(1, 1, 16, D_MODEL), flat[16 * D_MODEL :].reshape(1, 1, 8, D_MODEL)
    np.testing.assert_allclose(first, expected(model, PROMPTS[0], [1], ["resid_post"], list(range(16))), atol=1e-5)
    np.testing.assert_allclose(second, expected(model, PROMPTS[1], [1], ["resid_post"], list(range(8))), atol=1e-5)


def test_resid_post_norms_equal_diagnostics_per_token(client: TestClient) -> None:
    hs = client.post("/hidden_states", json={"prompt": PROMPTS[0]}).json()
    diag = client.get("/diagnostics", params={"prompt": PROMPTS[0], "per_token": "true"}).json()
    norms = np.linalg.norm(np.array(hs["data"][0])[:, 0], axis=-1)  # (layers, positions)
    for layer in range(N_LAYER):
        np.testing.assert_allclose(norms[layer], diag["layers"][layer]["resid_post"]["per_token"], rtol=1e-5)


def test_the_intervention_applies(client: TestClient) -> None:
    iv = {"skip": [{"layer": 1, "part": "attn"}]}
    out = client.post(
        "/hidden_states", json={"prompt": "abc", "layers": [1], "sites": ["attn_out"], "intervention": iv}
    )
    assert out.status_code == 200, out.text
    assert not np.array(out.json()["data"]).any()
    assert out.json()["intervention"]["skip"] == [{"layer": 1, "part": "attn"}]


@pytest.mark.parametrize("how", ["accept", "format"])
def test_safetensors_loads_with_transformer_lens_names(client: TestClient, model: Transformer, how: str) -> None:
    body: dict = {"prompts": ["abcd", "wxyz"], "sites": ["resid_pre", "resid_post"], "layers": [1]}
    headers = {"Accept": "application/vnd.safetensors"} if how == "accept" else {}
    if how == "format":
        body["format"] = "safetensors"
    resp = client.post("/hidden_states", json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/vnd.safetensors"
    tensors = load(resp.content)
    assert sorted(tensors) == ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre"]
    for i, text in enumerate(body["prompts"]):
        want = expected(model, text, [1], ["resid_post"], [0, 1, 2, 3])[0, 0]
        np.testing.assert_allclose(tensors["blocks.1.hook_resid_post"][i].numpy(), want, atol=1e-5)
    from safetensors import safe_open

    path = Path(client.app.state.settings.checkpoint).parent / f"export-{how}.safetensors"  # type: ignore[attr-defined]
    path.write_bytes(resp.content)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["token_ids"] == "[[97,98,99,100],[119,120,121,122]]"
    sha = client.post("/hidden_states", json={"prompt": "a"}).json()["checkpoint_sha256"]
    assert meta["checkpoint_sha256"] == sha and meta["sites"] == '["resid_pre","resid_post"]'


def test_safetensors_of_ragged_prompts_is_refused(client: TestClient) -> None:
    resp = client.post("/hidden_states", json={"prompts": PROMPTS, "format": "safetensors"})
    err = assert_error(resp, 400, "invalid_value", "positions")
    assert "same number" in err["message"]
    ok = client.post("/hidden_states", json={"prompts": PROMPTS, "format": "safetensors", "positions": "last"})
    assert load(ok.content)["blocks.0.hook_resid_post"].shape == (2, 1, D_MODEL)


def test_413_names_the_setting_and_the_size_before_any_forward(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(hidden_states_max_bytes=4096)
    import app.routes.readout as route

    calls, real = [], route.hidden_states

    def counted(*args: object) -> object:
        calls.append(args)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(route, "hidden_states", counted)
    # 2 layers x 5 sites x 16 positions x 16 floats x 4 bytes = 10240
    resp = client.post("/hidden_states", json={"prompt": PROMPTS[0], "sites": list(RESID_NAMES)})
    err = assert_error(resp, 413, "hidden_states_too_large")
    assert "10240 bytes" in err["message"] and "SHORTCUT_HIDDEN_STATES_MAX_BYTES" in err["message"]
    assert calls == []
    half = client.post("/hidden_states", json={"prompt": PROMPTS[0], "sites": ["resid_post"], "dtype": "float16"})
    assert half.status_code == 200 and len(calls) == 1  # 2 x 1 x 16 x 16 x 2 = 1024 bytes


def test_400s_name_the_field(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_prompts=2)
    assert_error(client.post("/hidden_states", json={"prompt": "ab", "layers": [0, 2]}), 400, param="layers[1]")
    err = assert_error(client.post("/hidden_states", json={"prompt": "ab", "positions": [5]}), 400, param="positions")
    assert "positions[0] is 5" in err["message"]
    err = assert_error(client.post("/hidden_states", json={"prompts": ["a", "b", "c"]}), 400, "too_many_prompts")
    assert "SHORTCUT_MAX_PROMPTS" in err["message"]
    assert_error(client.post("/hidden_states", json={"prompt": "x" * 65}), 400, "context_length_exceeded", "prompt")
    for bad in (
        {"prompt": "a", "prompts": ["b"]},
        {"prompt": "a", "sites": ["resid_pre", "resid_pre"]},
        {"prompt": "a", "sites": ["hook_resid"]},
    ):
        assert client.post("/hidden_states", json=bad).status_code == 422


# --- /patching ---------------------------------------------------------------------------------------------------

CLEAN, CORRUPT = "The cat sat", "The bat sat"  # one byte differs, at position 4


def test_patching_identities_over_http(client: TestClient) -> None:
    resp = client.post("/patching", json={"clean": CLEAN, "corrupt": CORRUPT, "sites": ["resid_pre", "resid_post"]})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["normalized"] is True and out["tokens"]["clean"]["ids"] == tokenizer.encode(CLEAN)
    pre0 = out["sites"]["resid_pre"][0]
    assert pre0[4] == pytest.approx(1.0, abs=1e-5)
    assert all(pre0[p] == pytest.approx(0.0, abs=1e-5) for p in range(11) if p != 4)
    assert out["sites"]["resid_post"][-1][-1] == pytest.approx(1.0, abs=1e-5)
    assert out["raw"]["resid_post"][-1][-1] == pytest.approx(out["clean_metric"], abs=1e-5)


def test_patching_raw_values_equal_hooked_runs(client: TestClient, model: Transformer) -> None:
    body = {
        "clean": CLEAN,
        "corrupt": CORRUPT,
        "sites": ["attn_out", "mlp_out"],
        "metric": "logit_diff",
        "target": "e",
        "contrast": "a",
    }
    out = client.post("/patching", json=body).json()
    clean, corrupt = tokenizer.encode(CLEAN), tokenizer.encode(CORRUPT)
    acts, _ = hooked_acts(model, clean)
    t, c = ord("e"), ord("a")
    for site in ("attn_out", "mlp_out"):
        for layer in range(N_LAYER):
            for pos in (0, 4, 10):
                logits = hooked_patch(model, corrupt, layer, site, pos, acts[site][layer][pos]).double()
                assert out["raw"][site][layer][pos] == pytest.approx(float(logits[t] - logits[c]), abs=1e-4)
    assert out["target"] == {"ids": [t], "text": ["e"]}


def test_patching_400s(make_client: Callable[..., TestClient]) -> None:
    client = make_client(patching_max_grid=40)
    err = assert_error(client.post("/patching", json={"clean": "abc", "corrupt": "abcd"}), 400, param="corrupt")
    assert "clean is 3 tokens and corrupt is 4 tokens" in err["message"]
    err = assert_error(
        client.post("/patching", json={"clean": "a" * 21, "corrupt": "b" * 21}), 400, "patching_grid_too_large"
    )
    assert "SHORTCUT_PATCHING_MAX_GRID" in err["message"] and "42" in err["message"]
    assert_error(client.post("/patching", json={"clean": "ab", "corrupt": "ac", "target": "é"}), 400, param="target")
    no_contrast = client.post("/patching", json={"clean": "ab", "corrupt": "ac", "metric": "logit_diff"})
    assert_error(no_contrast, 400, "invalid_value", "contrast")
    assert client.post("/patching", json={"clean": "ab", "corrupt": "ac", "sites": ["resid_mid"]}).status_code == 422


def test_readout_requests_are_counted(client: TestClient) -> None:
    client.post("/hidden_states", json={"prompt": "abcd", "encoding": "base64"})
    client.post("/patching", json={"clean": "ab", "corrupt": "ac"})
    samples = parse_metrics(client.get("/metrics").text)
    assert value(samples, "shortcut_readout_requests_total", kind="hidden_states") == 1
    assert value(samples, "shortcut_readout_requests_total", kind="patching") == 1
    assert value(samples, "shortcut_hidden_state_bytes_total") == 2 * 4 * D_MODEL * 4


def test_the_model_is_untouched(client: TestClient) -> None:
    """No per-request state stays on the shared model: a plain forward after patching is unchanged."""
    before = client.post("/hidden_states", json={"prompt": CORRUPT, "positions": "last"}).json()["data"]
    client.post("/patching", json={"clean": CLEAN, "corrupt": CORRUPT, "sites": ["resid_post"]})
    after = client.post("/hidden_states", json={"prompt": CORRUPT, "positions": "last"}).json()["data"]
    assert before == after
