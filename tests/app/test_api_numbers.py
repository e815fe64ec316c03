"""Through HTTP, the numbers against independent computations (issue #30): /generate's logprobs under logit_bias,
penalties and temperature against log_softmax of a full forward, and its trace's logit-lens probabilities against
/diagnostics' `logit_lens.top[*].prob`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from model import tokenizer
from model.checkpoint import load_checkpoint
from model.transformer import Transformer

PROMPT = "Once upon a time"
N_LAYER = 2  # APP_CONFIG


@pytest.fixture(scope="module")
def served_model(app_checkpoint: Path) -> Transformer:
    return load_checkpoint(app_checkpoint).model.eval().double()


@pytest.fixture
def exact(make_client: Callable[..., TestClient]) -> TestClient:
    """float32 decode weights: the served numbers are the reference forward's up to float32 rounding."""
    return make_client(decode_weights="float32")


@torch.no_grad()
def test_logprobs_are_raw_under_bias_penalties_and_temperature(exact: TestClient, served_model: Transformer) -> None:
    body = {
        "prompt": PROMPT,
        "max_new_tokens": 10,
        "temperature": 1.5,
        "seed": 21,
        "logprobs": 3,
        "logit_bias": {"101": 8.0, "32": -4.0},
        "presence_penalty": 1.0,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.4,
    }
    resp = exact.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    tokens = resp.json()["tokens"]
    ids = [t["id"] for t in tokens]
    n = len(PROMPT.encode())
    logp = torch.log_softmax(served_model(torch.tensor([tokenizer.encode(PROMPT) + ids])).logits[0, n - 1 : -1], -1)
    for i, t in enumerate(tokens):
        assert t["logprob"] == pytest.approx(float(logp[i, t["id"]]), abs=1e-4), i
        want = logp[i].topk(3)
        assert [x["id"] for x in t["top_logprobs"]] == want.indices.tolist()
        assert [x["logprob"] for x in t["top_logprobs"]] == pytest.approx(want.values.tolist(), abs=1e-4)
    assert 101 in ids  # the bias was in play


def test_trace_lens_probabilities_equal_diagnostics(exact: TestClient) -> None:
    """The first token's trace is the prompt's last position: its lens is /diagnostics' lens of the prompt."""
    out = exact.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2, "logit_lens_top": 4}).json()
    first = out["trace"]["tokens"][0]
    assert first["position"] == len(PROMPT.encode()) - 1
    diag = exact.post("/diagnostics", json={"prompt": PROMPT, "logit_lens": 4}).json()
    assert len(first["logit_lens"]) == len(diag["layers"]) == N_LAYER
    for traced, layer in zip(first["logit_lens"], diag["layers"], strict=True):
        top = layer["logit_lens"]["top"]
        assert [e["id"] for e in traced] == [e["id"] for e in top]
        assert [e["prob"] for e in traced] == pytest.approx([e["prob"] for e in top], abs=2e-6)
