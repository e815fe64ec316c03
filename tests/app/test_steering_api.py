"""`intervention.add` on /generate, /v1/completions, /v1/chat/completions and POST /diagnostics: inline vectors and
named ones (through `app.state.steering`, here a stand-in), the echo, every 400 with its field, metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.errors import APIError
from app.schemas import MAX_ADD_ENTRIES, MAX_VECTOR_LENGTH
from model import tokenizer
from model.checkpoint import load_checkpoint
from model.edits import MAX_COEFF, Intervention, VectorAdd
from tests.helpers import assert_error, parse_metrics, value

PROMPT = "Once upon a time"
D_MODEL, N_LAYER = 16, 2  # APP_CONFIG
VECTOR = (4 * torch.randn(D_MODEL, generator=torch.Generator().manual_seed(0))).tolist()
INLINE = {"add": [{"layer": 0, "vector": VECTOR, "coeff": 1.5}]}
NAMED = {"add": [{"layer": 0, "name": "caps", "coeff": 1.5}]}
VECTOR_DIGEST = VectorAdd.of(0, VECTOR).digest


class StandInStore:
    """What the named-vector store offers the routes: lookup by model, checkpoint and name."""

    def __init__(self, vectors: dict[str, list[float]], sha256: str | None = None) -> None:
        self.vectors, self.sha256, self.calls = vectors, sha256, []

    def lookup(self, model: str, checkpoint_sha256: str, name: str, field: str) -> torch.Tensor:
        self.calls.append((model, checkpoint_sha256, name, field))
        if name not in self.vectors:
            raise APIError(400, f"{field}: no steering vector named {name!r}", param=field, code="invalid_value")
        if self.sha256 is not None and checkpoint_sha256 != self.sha256:
            raise APIError(400, f"{field}: {name!r} was made for another checkpoint", param=field, code="invalid_value")
        return torch.tensor(self.vectors[name], dtype=torch.float32)


@pytest.fixture
def steered(client: TestClient) -> TestClient:
    client.app.state.steering = StandInStore({"caps": VECTOR})  # type: ignore[attr-defined]
    return client


def generate(client: TestClient, **body: object) -> dict:
    resp = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 12, "temperature": 0, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_an_inline_vector_changes_the_text_and_is_echoed_by_norm_and_hash(client: TestClient) -> None:
    plain, steered = generate(client), generate(client, intervention=INLINE)
    assert steered["text"] != plain["text"]
    digest = VECTOR_DIGEST
    assert steered["intervention"] == {
        "skip": [],
        "scale": [],
        "add": [
            {
                "layer": 0,
                "vector": {"norm": pytest.approx(float(torch.tensor(VECTOR).norm()), rel=1e-6), "sha256": digest},
                "coeff": 1.5,
                "positions": "all",
            }
        ],
    }
    assert generate(client, intervention={**INLINE, "add": [{**INLINE["add"][0], "coeff": 0}]})["text"] == plain["text"]
    # only at generated positions: the first token is the prompt's (unchanged), the rest follow the vector
    gen = generate(client, intervention={"add": [{**INLINE["add"][0], "positions": "generated"}]})
    assert gen["text"] != steered["text"] and gen["intervention"]["add"][0]["positions"] == "generated"


def test_a_named_vector_equals_the_same_vector_inline(steered: TestClient) -> None:
    named = generate(steered, intervention=NAMED)
    assert named["text"] == generate(steered, intervention=INLINE)["text"]
    assert named["intervention"]["add"] == [{"layer": 0, "name": "caps", "coeff": 1.5, "positions": "all"}]
    store = steered.app.state.steering  # type: ignore[attr-defined]
    assert store.calls[-1] == ("tiny", named["checkpoint_sha256"], "caps", "intervention.add[0].name")


@pytest.mark.parametrize(
    ("entry", "param"),
    [
        ({"layer": 2, "vector": VECTOR}, "intervention.add[1].layer"),
        ({"layer": -1, "vector": VECTOR}, "intervention.add[1].layer"),
        ({"layer": 0, "vector": VECTOR[:-1]}, "intervention.add[1].vector"),
        ({"layer": 0, "vector": [1e39] + VECTOR[1:]}, "intervention.add[1].vector"),  # not finite in float32
        ({"layer": 0, "vector": VECTOR, "coeff": MAX_COEFF + 1}, "intervention.add[1].coeff"),
        ({"layer": 0, "vector": VECTOR, "coeff": -(MAX_COEFF + 1)}, "intervention.add[1].coeff"),
        ({"layer": 0, "vector": VECTOR, "positions": "decode"}, "intervention.add[1].positions"),
        ({"layer": 0, "name": "nope"}, "intervention.add[1].name"),  # unknown to the store
    ],
)
def test_bad_add_entries_are_400s_naming_the_field_on_every_route(steered: TestClient, entry: dict, param: str) -> None:
    iv = {"add": [{"layer": 1, "vector": VECTOR}, entry]}
    for path, body in (
        ("/generate", {"prompt": PROMPT, "intervention": iv}),
        ("/diagnostics", {"prompt": PROMPT, "intervention": iv}),
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "intervention": iv}),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "intervention": iv},
        ),
    ):
        resp = steered.post(path, json=body)
        err = assert_error(resp, 400, code="invalid_value")
        assert err["param"] == param and param in err["message"], (path, err)


def test_named_vectors_without_a_store_are_a_400(client: TestClient) -> None:
    """An app without a store of named vectors (app.state.steering None) says so at the entry's name."""
    client.app.state.steering = None  # type: ignore[attr-defined]
    for path, body in (
        ("/generate", {"prompt": PROMPT, "intervention": NAMED}),
        ("/diagnostics", {"prompt": PROMPT, "intervention": NAMED}),
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "intervention": NAMED}),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "intervention": NAMED},
        ),
    ):
        err = assert_error(client.post(path, json=body), 400)
        assert err["param"] == "intervention.add[0].name" and "not available" in err["message"], (path, err)


def test_a_vector_for_another_checkpoint_is_the_stores_400(client: TestClient) -> None:
    client.app.state.steering = StandInStore({"caps": VECTOR}, sha256="0" * 64)  # type: ignore[attr-defined]
    err = assert_error(client.post("/generate", json={"prompt": PROMPT, "intervention": NAMED}), 400)
    assert err["param"] == "intervention.add[0].name" and "another checkpoint" in err["message"]


def test_malformed_add_entries_are_422s(client: TestClient) -> None:
    for bad in (
        {"layer": 0},  # neither vector nor name
        {"layer": 0, "vector": VECTOR, "name": "caps"},  # both
        {"layer": 0, "name": "bad name!"},
        {"layer": 0, "name": "x" * 65},
        {"layer": 0, "vector": ["1"] * D_MODEL},
        {"layer": 0, "vector": VECTOR, "coeff": True},
        {"layer": "0", "vector": VECTOR},
        {"layer": 0, "vector": [0.0] * (MAX_VECTOR_LENGTH + 1)},
        {"layer": 0, "vector": VECTOR, "extra": 1},
    ):
        resp = client.post("/generate", json={"prompt": PROMPT, "intervention": {"add": [bad]}})
        assert_error(resp, 422)
        assert resp.json()["error"]["param"].startswith("intervention.add.0"), resp.json()
    too_many = {"add": [{"layer": 0, "vector": VECTOR}] * (MAX_ADD_ENTRIES + 1)}
    assert_error(client.post("/generate", json={"prompt": PROMPT, "intervention": too_many}), 422)


def test_diagnostics_under_a_vector_equal_the_reference_forward(client: TestClient, app_checkpoint: Path) -> None:
    iv = {"add": [{"layer": 0, "vector": VECTOR, "coeff": 0.5}], "skip": [{"layer": 1, "part": "mlp"}]}
    diag = client.post("/diagnostics", json={"prompt": PROMPT, "per_token": True, "intervention": iv}).json()
    assert diag["options"]["intervention"]["add"][0]["vector"]["sha256"] == VECTOR_DIGEST
    assert [layer["intervened"] for layer in diag["layers"]] == [True, True]
    model = load_checkpoint(app_checkpoint).model.eval()
    edits = Intervention(skip=((1, "mlp"),), add=(VectorAdd.of(0, VECTOR, 0.5),)).compile(N_LAYER)
    with torch.no_grad():
        ref = model(torch.tensor([tokenizer.encode(PROMPT)]), edits=edits, return_resid=True)
    for layer, r in zip(diag["layers"], ref.resid, strict=True):  # type: ignore[arg-type]
        want = r["resid_post"][0].norm(dim=-1)
        torch.testing.assert_close(torch.tensor(layer["resid_post"]["per_token"]), want, rtol=1e-4, atol=1e-5)
    plain = client.post("/diagnostics", json={"prompt": PROMPT}).json()
    assert plain["layers"][1]["resid_pre"]["mean"] != diag["layers"][1]["resid_pre"]["mean"]  # the next block sees it
    text = client.post("/diagnostics", json={"prompt": PROMPT, "intervention": iv, "format": "text"}).text
    assert "model: tiny" in text


def test_v1_routes_take_add_and_echo_it(steered: TestClient) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    plain = steered.post("/v1/completions", json=body).json()
    out = steered.post("/v1/completions", json={**body, "intervention": INLINE}).json()
    assert out["choices"][0]["text"] != plain["choices"][0]["text"]
    assert out["intervention"]["add"][0]["vector"]["sha256"] == VECTOR_DIGEST
    assert out["choices"][0]["text"] == generate(steered, max_new_tokens=8, intervention=INLINE)["text"]
    named = steered.post("/v1/completions", json={**body, "intervention": NAMED, "n": 2}).json()
    assert [c["text"] for c in named["choices"]] == [out["choices"][0]["text"]] * 2
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
    plain_chat = steered.post("/v1/chat/completions", json=chat).json()
    steered_chat = steered.post("/v1/chat/completions", json={**chat, "intervention": NAMED}).json()
    assert steered_chat["intervention"]["add"][0]["name"] == "caps"
    assert steered_chat["choices"][0]["message"] != plain_chat["choices"][0]["message"]


def test_requests_with_vectors_are_counted(client: TestClient) -> None:
    def counts() -> dict[str, float]:
        samples = parse_metrics(client.get("/metrics").text)
        return {p: value(samples, "shortcut_interventions_total", part=p) for p in ("block", "attn", "mlp", "add")}

    before = counts()
    generate(client, intervention=INLINE)
    generate(client, intervention={**INLINE, "skip": [{"layer": 1, "part": "mlp"}]})
    generate(client)
    after = counts()
    assert {p: after[p] - before[p] for p in after} == {"block": 0, "attn": 0, "mlp": 1, "add": 2}
