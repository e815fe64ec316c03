"""OpenAI compatibility: the official `openai` client against a live `python -m app` server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import openai
import pytest

from model import tokenizer
from tests.helpers import assert_error

PROMPT = "The residual stream"


@pytest.fixture(scope="module")
def oai(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0, timeout=30)


def native(live_server: str, **body: object) -> dict:
    """The same generation through /generate, as the reference."""
    resp = httpx.post(f"{live_server}/generate", json={"prompt": PROMPT, **body}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_models(oai: openai.OpenAI, live_server: str, app_checkpoint: Path) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = httpx.get(f"{live_server}/v1/models").json()
    assert card["object"] == "list"
    m = card["data"][0]
    assert m["object"] == "model" and m["owned_by"] == "shortcut"
    assert m["context_window"] == 64 and m["n_layer"] == 2 and m["d_model"] == 16 and m["residual"] is True
    assert m["checkpoint_sha256"] == hashlib.sha256(app_checkpoint.read_bytes()).hexdigest()


def test_completion(oai: openai.OpenAI, live_server: str) -> None:
    resp = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert resp.object == "text_completion"
    assert resp.model == "tiny"
    assert resp.id.startswith("cmpl-")
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text == native(live_server, max_new_tokens=10, temperature=0)["text"]
    assert resp.usage.prompt_tokens == len(PROMPT.encode())
    assert resp.usage.completion_tokens == 10
    assert resp.usage.total_tokens == len(PROMPT.encode()) + 10
    assert resp.system_fingerprint.startswith("sha256-")
    assert choice.logprobs is None


def test_completion_seed_and_stop(oai: openai.OpenAI, live_server: str) -> None:
    a = oai.completions.create(model="tiny", prompt=[PROMPT], max_tokens=12, seed=11, top_p=0.9)
    b = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=11, top_p=0.9)
    assert a.choices[0].text == b.choices[0].text == native(live_server, max_new_tokens=12, seed=11, top_p=0.9)["text"]
    full = native(live_server, max_new_tokens=20, temperature=0)["text"]
    i = next(i for i in range(3, 18) if "\ufffd" not in full[i] and full.find(full[i]) == i)
    stopped = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[full[i]])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[:i]


def test_completion_stream(oai: openai.OpenAI, live_server: str) -> None:
    chunks = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert len(chunks) == 13  # one per token, then the finish chunk
    assert all(c.object == "text_completion" and c.model == "tiny" for c in chunks)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].text for c in chunks) == native(live_server, max_new_tokens=12, temperature=0)["text"]


def test_completion_logprobs(oai: openai.OpenAI, live_server: str) -> None:
    resp = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    ref = native(live_server, max_new_tokens=8, temperature=0, logprobs=3)["tokens"]
    assert lp.tokens == [tokenizer.token_text(t["id"]) for t in ref]
    assert lp.token_logprobs == pytest.approx([t["logprob"] for t in ref], abs=1e-6)
    assert len(lp.top_logprobs) == 8
    for tops, t in zip(lp.top_logprobs, ref, strict=True):
        assert tops == pytest.approx({x["text"]: x["logprob"] for x in t["top_logprobs"]}, abs=1e-6)
        assert len(tops) == 3
    streamed = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                           stream=True))
    # text_offset: where each token's released text starts in the completion (the streamed deltas)
    offsets, pos = [], 0
    for c in streamed[:-1]:
        offsets.append(pos)
        pos += len(c.choices[0].text)
    assert lp.text_offset == offsets
    assert [c.choices[0].logprobs.text_offset[0] for c in streamed[:-1]] == offsets
    assert [c.choices[0].logprobs.token_logprobs[0] for c in streamed[:-1]] == lp.token_logprobs


def test_n_2_is_422(oai: openai.OpenAI, live_server: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, n=2)
    assert info.value.status_code == 422
    resp = httpx.post(f"{live_server}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "n": 2})
    assert_error(resp, 422, param="n")


def test_unknown_model_is_404(oai: openai.OpenAI, live_server: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert info.value.status_code == 404
    assert "no-such-model" in str(info.value)
    resp = httpx.post(f"{live_server}/v1/completions", json={"model": "no-such-model", "prompt": PROMPT})
    assert_error(resp, 404, code="model_not_found", param="model")


def test_too_long_is_400(oai: openai.OpenAI, live_server: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny", prompt="x" * 60, max_tokens=10)
    assert "64" in str(info.value)
    # the error names this route's field (max_tokens), not the engine's
    resp = httpx.post(f"{live_server}/v1/completions", json={"prompt": "x" * 60, "max_tokens": 10})
    err = assert_error(resp, 400, code="context_length_exceeded", param="max_tokens")
    assert "max_tokens (10)" in err["message"] and "max_new_tokens" not in err["message"]
    resp = httpx.post(f"{live_server}/v1/completions", json={"prompt": "x" * 70})
    assert_error(resp, 400, code="context_length_exceeded", param="prompt")
    resp = httpx.post(f"{live_server}/v1/completions", json={"prompt": "hi", "stop": ["x" * 65]})
    assert_error(resp, 400, code="invalid_value", param="stop")
