"""`intervention`, `trace` and `logit_lens_top` on /generate and /diagnostics: echo, errors, SSE, metrics."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from tests.helpers import assert_error, parse_metrics, parse_sse, value

PROMPT = "Once upon a time"
SKIP = {"skip": [{"layer": 0, "part": "block"}]}
MIXED = {"skip": [{"layer": 1, "part": "mlp"}], "scale": [{"layer": 0, "part": "attn", "factor": 0.5}]}
N_LAYER = 2  # APP_CONFIG


def generate(client: TestClient, **body: object) -> dict:
    resp = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 10, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_intervention_changes_the_text_and_is_echoed(client: TestClient) -> None:
    plain = generate(client, seed=4, temperature=0.7)
    skipped = generate(client, seed=4, temperature=0.7, intervention=SKIP)
    assert plain["intervention"] is None and plain["trace"] is None
    assert skipped["intervention"] == {"skip": [{"layer": 0, "part": "block"}], "scale": []}
    assert skipped["text"] != plain["text"]
    assert generate(client, seed=4, temperature=0.7, intervention=SKIP)["text"] == skipped["text"]
    assert generate(client, seed=4, temperature=0.7, intervention={})["text"] == plain["text"]  # empty: no change


@pytest.mark.parametrize(
    ("intervention", "param"),
    [
        ({"skip": [{"layer": 2, "part": "mlp"}]}, "intervention.skip[0].layer"),
        ({"skip": [{"layer": 0, "part": "mlp"}, {"layer": 1, "part": "ffn"}]}, "intervention.skip[1].part"),
        ({"scale": [{"layer": 0, "part": "mlp", "factor": 101}]}, "intervention.scale[0].factor"),
        (
            {"skip": [{"layer": 0, "part": "mlp"}], "scale": [{"layer": 0, "part": "mlp", "factor": 2}]},
            "intervention.scale[0]",
        ),
    ],
)
def test_bad_interventions_are_400s_naming_the_entry(client: TestClient, intervention: dict, param: str) -> None:
    for path, body in (
        ("/generate", {"prompt": PROMPT, "intervention": intervention}),
        ("/diagnostics", {"prompt": PROMPT, "intervention": intervention}),
    ):
        resp = client.post(path, json=body)
        assert_error(resp, 400, code="invalid_value")
        assert resp.json()["error"]["param"] == param and param in resp.json()["error"]["message"]


def test_malformed_interventions_are_422s(client: TestClient) -> None:
    for bad in (
        {"skip": [{"layer": "0", "part": "mlp"}]},
        {"skip": [{"layer": 0}]},
        {"drop": []},
        {"scale": [{"layer": 0, "part": "mlp", "factor": True}]},
    ):
        assert_error(client.post("/generate", json={"prompt": PROMPT, "intervention": bad}), 422)
    assert_error(client.post("/generate", json={"prompt": PROMPT, "logit_lens_top": 6}), 422)


def test_stream_carries_a_trace_per_token(client: TestClient) -> None:
    resp = client.post(
        "/generate",
        json={
            "prompt": PROMPT,
            "max_new_tokens": 6,
            "temperature": 0,
            "stream": True,
            "trace": True,
            "logit_lens_top": 2,
            "intervention": MIXED,
        },
    )
    events = parse_sse(resp.text)
    tokens = [d for e, d in events if e == "token"]
    done = next(d for e, d in events if e == "done")
    assert len(tokens) == 6 == len(done["trace"]["tokens"])
    n_prompt = len(PROMPT.encode())
    for i, (ev, final) in enumerate(zip(tokens, done["trace"]["tokens"], strict=True)):
        t = ev["trace"]
        assert t["position"] == n_prompt - 1 + i
        assert len(t["resid_norm"]) == len(t["update_ratio"]) == N_LAYER
        assert [len(top) for top in t["logit_lens"]] == [2] * N_LAYER
        assert t == final
    assert done["intervention"] == {**MIXED, "skip": MIXED["skip"]}
    untraced = parse_sse(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 3, "stream": True}).text)
    assert all("trace" not in d for e, d in untraced if e == "token")


def test_trace_matches_diagnostics_through_the_api(client: TestClient) -> None:
    out = generate(client, temperature=0, trace=True, intervention=MIXED, max_new_tokens=8, logprobs=1)
    diag = client.post(
        "/diagnostics", json={"prompt": PROMPT + out["text"], "per_token": True, "intervention": MIXED}
    ).json()
    assert [e["intervened"] for e in diag["layers"]] == [True, True]
    # the random model may write invalid UTF-8, which the text cannot carry back: compare where it round-trips
    ids = list(PROMPT.encode()) + [t["id"] for t in out["tokens"]]
    same = next(
        (i for i, (a, b) in enumerate(zip(ids, diag["tokens"]["ids"], strict=False)) if a != b),
        min(len(ids), diag["n_tokens"]),
    )
    compared = [t for t in out["trace"]["tokens"] if t["position"] < same]
    assert compared and compared[0]["position"] == len(PROMPT.encode()) - 1
    for t in compared:
        p = t["position"]
        norms = [layer["resid_post"]["per_token"][p] for layer in diag["layers"]]
        ratios = [layer["update_ratio"]["per_token"]["block"][p] for layer in diag["layers"]]
        # the served decode step may use float16 weights; /diagnostics runs float32 and rounds to 6 digits
        torch.testing.assert_close(torch.tensor(t["resid_norm"]), torch.tensor(norms), rtol=3e-3, atol=1e-5)
        torch.testing.assert_close(torch.tensor(t["update_ratio"]), torch.tensor(ratios), rtol=3e-3, atol=1e-5)


def test_diagnostics_with_an_intervention(client: TestClient) -> None:
    clean = client.post("/diagnostics", json={"prompt": PROMPT}).json()
    skipped = client.post("/diagnostics", json={"prompt": PROMPT, "intervention": SKIP}).json()
    assert skipped["options"]["intervention"] == {"skip": SKIP["skip"], "scale": []}
    assert skipped["loss"] != clean["loss"]
    assert skipped["layers"][0]["update_ratio"]["block"] == 0  # skipped block: the identity
    text = client.post("/diagnostics", json={"prompt": PROMPT, "intervention": SKIP, "format": "text"}).text
    assert "model: tiny (2 layers, residual)" in text and "intervention (* layers): skip 0.block" in text
    assert any(line.split()[:1] == ["0*"] for line in text.splitlines())


def test_interventions_are_counted_by_part(client: TestClient) -> None:
    def counts() -> dict[str, float]:
        samples = parse_metrics(client.get("/metrics").text)
        return {p: value(samples, "shortcut_interventions_total", part=p) for p in ("block", "attn", "mlp")}

    before = counts()
    generate(client, intervention=MIXED)
    generate(client, intervention=SKIP)
    generate(client)
    after = counts()
    assert {p: after[p] - before[p] for p in after} == {"block": 1, "attn": 1, "mlp": 1}


def test_v1_completions_take_the_extensions(client: TestClient) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()
    assert "intervention" not in plain and "trace" not in plain["choices"][0]
    out = client.post("/v1/completions", json={**body, "intervention": SKIP, "trace": True}).json()
    assert out["intervention"] == {"skip": SKIP["skip"], "scale": []}
    assert out["choices"][0]["text"] != plain["choices"][0]["text"]
    trace = out["choices"][0]["trace"]
    assert [t["position"] for t in trace] == list(range(len(PROMPT.encode()) - 1, len(PROMPT.encode()) + 4))
    assert out["choices"][0]["text"] == generate(client, max_new_tokens=5, temperature=0, intervention=SKIP)["text"]
    events = parse_sse(client.post("/v1/completions", json={**body, "stream": True, "trace": True}).text)
    chunks = [d for _, d in events if d != "[DONE]"]
    assert sum(len(c["choices"][0]["trace"]) for c in chunks) == 5  # each chunk: the traces of its tokens
    bad = client.post("/v1/completions", json={**body, "intervention": {"skip": [{"layer": 9, "part": "mlp"}]}})
    assert_error(bad, 400, code="invalid_value")
    assert bad.json()["error"]["param"] == "intervention.skip[0].layer"


def test_v1_chat_takes_the_extensions(client: TestClient) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "trace": True,
        "intervention": MIXED,
    }
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["intervention"] == MIXED and len(out["choices"][0]["trace"]) == out["usage"]["completion_tokens"]
