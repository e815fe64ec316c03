"""/generate's `return_hidden_states`: each token carries the stream at the position that produced it (the prompt's
last position for the first token), from the decode step itself (TorchScript, or the fused C step in float32 and
float16), equal to a full reference forward over the prompt and the generated tokens; SSE; caps and 400s."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model import tokenizer
from model.checkpoint import load_checkpoint
from model.fast import fused_available
from model.transformer import Transformer
from tests.helpers import assert_error, parse_metrics, parse_sse, value

PROMPT = "Once upon a time"
N_LAYER, D_MODEL = 2, 16
SPEC = {"layers": "all", "sites": ["resid_pre", "resid_post"]}


@pytest.fixture(scope="module")
def served_model(app_checkpoint: Path) -> Transformer:
    return load_checkpoint(app_checkpoint).model.eval()


def reference(model: Transformer, ids: list[int]) -> np.ndarray:
    """(positions, layers, 2 sites, d_model): resid_pre and resid_post of the reference forward over `ids`."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), return_resid=True)
    assert out.resid is not None
    per_layer = [torch.stack([r["resid_pre"][0], r["resid_post"][0]], dim=1) for r in out.resid]  # each (T, 2, C)
    return torch.stack(per_layer, dim=1).numpy()


# (decode_backend, decode_weights, tolerance): float16 weights and cache are held to the fused tests' 5e-3
BACKENDS = [("torchscript", "float32", 1e-4), ("fused", "float32", 1e-4), ("fused", "auto", 5e-3)]


@pytest.mark.parametrize(("backend", "weights", "tol"), BACKENDS)
def test_vectors_equal_the_reference_forward_at_each_producing_position(
    make_client: Callable[..., TestClient], served_model: Transformer, backend: str, weights: str, tol: float
) -> None:
    if backend == "fused" and not fused_available():
        pytest.skip("the fused step is not built here")
    client = make_client(decode_backend=backend, decode_weights=weights)
    body = {"prompt": PROMPT, "max_new_tokens": 6, "temperature": 0, "logprobs": 1, "return_hidden_states": SPEC}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    hs = out["hidden_states"]
    assert hs["shape"] == [6, N_LAYER, 2, D_MODEL] and hs["layers"] == [0, 1]
    ids = [t["id"] for t in out["tokens"]]
    prompt = tokenizer.encode(PROMPT)
    ref = reference(served_model, prompt + ids[:-1])  # token k came from position len(prompt) - 1 + k
    got = np.array(hs["data"])  # (tokens, layers, sites, d_model)
    np.testing.assert_allclose(got, ref[len(prompt) - 1 :], atol=tol, rtol=1e-3)
    np.testing.assert_array_equal(got[:, 1, 0], got[:, 0, 1])  # resid_pre of layer 1 is resid_post of layer 0


def test_sse_token_events_carry_each_tokens_vectors_and_done_all_of_them(client: TestClient) -> None:
    spec = {"layers": [1], "sites": ["resid_post"], "encoding": "base64", "dtype": "float16"}
    body = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0, "stream": True, "return_hidden_states": spec}
    events = parse_sse(client.post("/generate", json=body).text)
    tokens = [d for e, d in events if e == "token"]
    done = next(d for e, d in events if e == "done")
    per_token = [np.frombuffer(base64.b64decode(t["hidden_states"]), "<f2").reshape(1, 1, D_MODEL) for t in tokens]
    whole = np.frombuffer(base64.b64decode(done["hidden_states"]["data"]), "<f2").reshape(4, 1, 1, D_MODEL)
    assert len(per_token) == 4
    np.testing.assert_array_equal(np.stack(per_token), whole)
    plain = client.post("/generate", json={**body, "stream": False}).json()
    assert plain["hidden_states"]["data"] == done["hidden_states"]["data"]  # greedy: the same vectors


def test_the_intervention_shows_in_the_vectors(client: TestClient) -> None:
    body = {
        "prompt": PROMPT,
        "max_new_tokens": 3,
        "temperature": 0,
        "return_hidden_states": {"layers": [0], "sites": ["resid_pre", "resid_post"]},
        "intervention": {"skip": [{"layer": 0, "part": "block"}]},
    }
    got = np.array(client.post("/generate", json=body).json()["hidden_states"]["data"])  # (3, 1, 2, C)
    np.testing.assert_array_equal(got[:, 0, 0], got[:, 0, 1])  # a skipped block passes the stream unchanged


def test_no_trace_unless_asked_and_no_vectors_unless_asked(client: TestClient) -> None:
    with_vectors = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2, "return_hidden_states": {}})
    assert with_vectors.json()["trace"] is None and with_vectors.json()["hidden_states"]["shape"][0] == 2
    plain = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2, "trace": True}).json()
    assert plain["hidden_states"] is None and plain["trace"] is not None


def test_sites_inside_a_block_point_to_hidden_states(client: TestClient) -> None:
    body = {"prompt": PROMPT, "return_hidden_states": {"sites": ["resid_post", "mlp_out"]}}
    err = assert_error(client.post("/generate", json=body), 400, "invalid_value", "return_hidden_states.sites[1]")
    assert "POST /hidden_states" in err["message"]
    body = {"prompt": PROMPT, "return_hidden_states": {"layers": [2]}}
    assert_error(client.post("/generate", json=body), 400, "invalid_value", "return_hidden_states.layers[0]")


def test_bytes_are_capped_before_queueing(make_client: Callable[..., TestClient]) -> None:
    client = make_client(hidden_states_max_bytes=4096)
    body = {"prompt": PROMPT, "max_new_tokens": 20, "return_hidden_states": SPEC}  # 20 x 4 x 16 x 4 = 5120
    err = assert_error(client.post("/generate", json=body), 413, "hidden_states_too_large", "return_hidden_states")
    assert "5120 bytes" in err["message"] and "SHORTCUT_HIDDEN_STATES_MAX_BYTES" in err["message"]
    ok = client.post("/generate", json={**body, "max_new_tokens": 16})  # 4096
    assert ok.status_code == 200
    samples = parse_metrics(client.get("/metrics").text)
    assert value(samples, "shortcut_readout_requests_total", kind="generate_hidden_states") == 1
    assert value(samples, "shortcut_hidden_state_bytes_total") == 4096
