"""/steering/vectors and the store behind it: make (equal to an independent computation) or upload, 201/409/replace/
404/204, the API key, persistence across a restart, bad files skipped by name, two app instances sharing one folder,
`lookup` and its errors, and every cap's 400/413 naming its setting."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.errors import APIError
from app.steering import SteeringStore
from model import tokenizer
from model.checkpoint import load_checkpoint
from model.steering import SteeringVector, load_vector, save_vector
from tests.helpers import assert_error, parse_metrics, value
from tests.model.test_steering_vectors import independent_resid_post

KEY = "s3cret-key_0123456789"
POSITIVE = ["TO BE OR NOT", "ALL THE WORLD"]
NEGATIVE = ["to be or not", "all the world", "a stage"]
FIELD = "intervention.add[0].name"
INFO_KEYS = {"name", "model", "checkpoint_sha256", "layer", "norm", "positive", "negative", "reduce", "created"}

MakeClient = Callable[..., TestClient]


@pytest.fixture
def vec_dir(tmp_path: Path) -> Path:
    return tmp_path / "vectors"


@pytest.fixture
def client(make_client: MakeClient, vec_dir: Path) -> TestClient:
    return make_client(steering_dir=vec_dir)


def served(client: TestClient, model: str = "tiny"):  # noqa: ANN201
    return client.app.state.models[model]  # type: ignore[attr-defined]


def store(client: TestClient) -> SteeringStore:
    return client.app.state.steering  # type: ignore[attr-defined]


def upload(client: TestClient, name: str = "ones", layer: int = 0, scale: float = 1.0, **kw: object):  # noqa: ANN201
    d = served(client).checkpoint.config.d_model
    return client.post("/steering/vectors", json={"name": name, "layer": layer, "vector": [scale] * d, **kw})


@pytest.mark.parametrize("reduce", ["mean", "last"])
def test_made_vector_equals_an_independent_computation(client: TestClient, app_checkpoint: Path, reduce: str) -> None:
    r = client.post(
        "/steering/vectors",
        json={"name": "upper", "layer": 1, "positive": POSITIVE, "negative": NEGATIVE, "reduce": reduce},
    )
    assert r.status_code == 201, r.text
    meta = r.json()
    assert set(meta) == INFO_KEYS
    model = load_checkpoint(app_checkpoint).model
    with torch.no_grad():

        def reduced(text: str) -> torch.Tensor:
            x = independent_resid_post(model, tokenizer.encode(text), 1)
            return x.mean(0) if reduce == "mean" else x[-1]

        want = torch.stack([reduced(t) for t in POSITIVE]).mean(0) - torch.stack([reduced(t) for t in NEGATIVE]).mean(0)
    got = client.get("/steering/vectors/upper").json()
    torch.testing.assert_close(torch.tensor(got.pop("vector")), want, rtol=1e-5, atol=1e-5)
    assert got == meta
    assert meta["name"] == "upper" and meta["model"] == "tiny" and meta["layer"] == 1
    assert (meta["positive"], meta["negative"], meta["reduce"]) == (2, 3, reduce)
    assert meta["checkpoint_sha256"] == served(client).sha256
    assert meta["norm"] == pytest.approx(float(want.norm()), rel=1e-5)
    torch.testing.assert_close(
        store(client).lookup("tiny", served(client).sha256, "upper", FIELD), want, rtol=1e-5, atol=1e-5
    )


def test_upload_list_get_delete(client: TestClient, vec_dir: Path) -> None:
    r = upload(client, "ones", layer=1, scale=0.5)
    assert r.status_code == 201, r.text
    d = served(client).checkpoint.config.d_model
    assert r.json()["norm"] == pytest.approx(0.5 * d**0.5)
    assert (r.json()["positive"], r.json()["negative"], r.json()["reduce"]) == (0, 0, None)
    assert upload(client, "twos", scale=2.0).status_code == 201
    listed = client.get("/steering/vectors").json()
    assert [m["name"] for m in listed["data"]] == ["ones", "twos"]
    assert all(set(m) == INFO_KEYS for m in listed["data"])
    assert client.get("/steering/vectors/twos").json()["vector"] == [2.0] * d
    assert sorted(p.name for p in vec_dir.iterdir()) == ["ones.safetensors", "twos.safetensors"]
    r = client.delete("/steering/vectors/ones")
    assert r.status_code == 204 and r.content == b""
    assert [m["name"] for m in client.get("/steering/vectors").json()["data"]] == ["twos"]
    assert [p.name for p in vec_dir.iterdir()] == ["twos.safetensors"]
    assert_error(client.get("/steering/vectors/ones"), 404, "steering_vector_not_found", "name")
    assert_error(client.delete("/steering/vectors/ones"), 404, "steering_vector_not_found", "name")
    assert_error(client.get("/steering/vectors/no%2Fsuch"), 404)


def test_existing_name_is_409_unless_replace(client: TestClient) -> None:
    assert upload(client, "v", scale=1.0).status_code == 201
    assert_error(upload(client, "v", scale=3.0), 409, "steering_vector_exists", "name")
    r = client.post("/steering/vectors", json={"name": "v", "layer": 0, "positive": ["A"], "negative": ["a"]})
    assert_error(r, 409, "steering_vector_exists", "name")  # refused before any computation
    assert client.get("/steering/vectors/v").json()["vector"][0] == 1.0
    r = upload(client, "v", layer=1, scale=3.0, replace=True)
    assert r.status_code == 201 and r.json()["layer"] == 1
    assert client.get("/steering/vectors/v").json()["vector"][0] == 3.0
    assert upload(client, "fresh", replace=True).status_code == 201  # replace of a new name just creates it


def test_in_memory_without_a_folder(make_client: MakeClient, tmp_path: Path) -> None:
    client = make_client()
    assert store(client).directory is None
    assert upload(client, "mem").status_code == 201
    assert_error(upload(client, "mem"), 409, "steering_vector_exists")
    assert [m["name"] for m in client.get("/steering/vectors").json()["data"]] == ["mem"]
    assert client.delete("/steering/vectors/mem").status_code == 204
    assert client.get("/steering/vectors").json() == {"data": []}


def test_writes_and_reads_need_the_key_when_one_is_set(make_client: MakeClient, vec_dir: Path) -> None:
    client = make_client(api_key=KEY, steering_dir=vec_dir)
    d = served(client).checkpoint.config.d_model
    body = {"name": "k", "layer": 0, "vector": [1.0] * d}
    good, bad = {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer wrong"}
    for headers, code in [({}, "missing_api_key"), (bad, "invalid_api_key")]:
        assert_error(client.post("/steering/vectors", json=body, headers=headers), 401, code)
        assert_error(client.get("/steering/vectors", headers=headers), 401, code)
        assert_error(client.get("/steering/vectors/k", headers=headers), 401, code)
        assert_error(client.delete("/steering/vectors/k", headers=headers), 401, code)
    assert not vec_dir.exists() or not list(vec_dir.iterdir())
    assert client.post("/steering/vectors", json=body, headers=good).status_code == 201
    assert client.get("/steering/vectors/k", headers=good).status_code == 200
    assert_error(client.delete("/steering/vectors/k", headers=bad), 401)
    assert client.delete("/steering/vectors/k", headers=good).status_code == 204


def test_vectors_persist_across_a_restart(make_client: MakeClient, vec_dir: Path) -> None:
    first = make_client(steering_dir=vec_dir)
    made = first.post("/steering/vectors", json={"name": "up", "layer": 1, "positive": POSITIVE, "negative": NEGATIVE})
    assert made.status_code == 201
    before = first.get("/steering/vectors/up").json()
    first.__exit__(None, None, None)
    second = make_client(steering_dir=vec_dir)  # a new app instance: it reads the folder at start
    gauge = value(parse_metrics(second.get("/metrics").text), "shortcut_steering_vectors", model="tiny")
    assert gauge == 1  # loaded before any request asked
    assert second.get("/steering/vectors/up").json() == before
    assert second.get("/steering/vectors").json()["data"] == [made.json()]
    got = store(second).lookup("tiny", served(second).sha256, "up", FIELD)
    assert got.tolist() == pytest.approx(before["vector"])


def test_a_bad_file_is_skipped_with_its_name_logged(
    make_client: MakeClient, vec_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vec_dir.mkdir()
    (vec_dir / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    (vec_dir / "bad name!.safetensors").write_bytes(b"")
    (vec_dir / "notes.txt").write_text("ignored: not a vector file")
    with caplog.at_level(logging.ERROR, logger="app.steering"):
        client = make_client(steering_dir=vec_dir)
        at_start = [r.getMessage() for r in caplog.records]  # logged while the server starts
        assert any("broken.safetensors" in m for m in at_start), at_start
        assert upload(client, "good").status_code == 201
        listed = client.get("/steering/vectors").json()["data"]
    assert [m["name"] for m in listed] == ["good"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("broken.safetensors" in m and "not a safetensors file" in m for m in messages), messages
    assert any("bad name!.safetensors" in m for m in messages), messages
    assert len(messages) == 2  # each bad file logged once, not on every listing
    assert client.get("/health").status_code == 200
    assert_error(client.get("/steering/vectors/broken"), 404)


def write_foreign(vec_dir: Path, name: str, model: str, sha: str, d: int) -> None:
    vec_dir.mkdir(exist_ok=True)
    vec = SteeringVector(name, model, sha, 0, torch.ones(d), 1, 1, "mean", "contrast", 1_700_000_000)
    save_vector(vec_dir / f"{name}.safetensors", vec)


def test_lookup_errors_name_the_field(client: TestClient, vec_dir: Path) -> None:
    s, sha = store(client), served(client).sha256
    d = served(client).checkpoint.config.d_model
    write_foreign(vec_dir, "old", "tiny", "00" * 32, d)  # made for another checkpoint of the same name
    write_foreign(vec_dir, "elsewhere", "other", sha, d)  # made for another model
    for name, code in [
        ("missing", "steering_vector_not_found"),
        ("bad/name", "steering_vector_not_found"),
        ("x" * 65, "steering_vector_not_found"),
        ("old", "steering_vector_model_mismatch"),
        ("elsewhere", "steering_vector_model_mismatch"),
    ]:
        with pytest.raises(APIError) as e:
            s.lookup("tiny", sha, name, "intervention.add[3].name")
        assert (e.value.status, e.value.param, e.value.code) == (400, "intervention.add[3].name", code)
        assert e.value.message.startswith("intervention.add[3].name: ")
    with pytest.raises(APIError, match="checkpoint 000000000000"):
        s.lookup("tiny", sha, "old", FIELD)
    assert upload(client, "mine").status_code == 201
    got = s.lookup("tiny", sha, "mine", FIELD)
    assert got.dtype == torch.float32 and got.shape == (d,)
    got.zero_()  # the caller's copy: the stored vector is untouched
    assert s.lookup("tiny", sha, "mine", FIELD).sum() == d


def test_two_instances_share_one_folder(make_client: MakeClient, vec_dir: Path) -> None:
    a, b = make_client(steering_dir=vec_dir), make_client(steering_dir=vec_dir)
    sha = served(a).sha256
    assert b.get("/steering/vectors").json() == {"data": []}
    made = a.post("/steering/vectors", json={"name": "up", "layer": 1, "positive": POSITIVE, "negative": NEGATIVE})
    assert made.status_code == 201
    assert b.get("/steering/vectors").json()["data"] == [made.json()]  # listed through the other instance
    want = a.get("/steering/vectors/up").json()["vector"]
    assert store(b).lookup("tiny", sha, "up", FIELD).tolist() == pytest.approx(want)  # used by name there
    assert_error(upload(b, "up"), 409, "steering_vector_exists")  # the name is taken everywhere
    assert upload(b, "up", scale=2.0, replace=True).status_code == 201  # replaced through b ...
    assert store(a).lookup("tiny", sha, "up", FIELD).tolist() == [2.0] * len(want)  # ... a sees the new file
    assert b.delete("/steering/vectors/up").status_code == 204  # deleted through b ...
    with pytest.raises(APIError) as e:  # ... gone from a at once
        store(a).lookup("tiny", sha, "up", FIELD)
    assert e.value.code == "steering_vector_not_found"
    assert_error(a.get("/steering/vectors/up"), 404)
    assert a.get("/steering/vectors").json() == {"data": []}
    assert_error(a.delete("/steering/vectors/up"), 404)


def test_a_changed_file_is_read_again(client: TestClient, vec_dir: Path) -> None:
    assert upload(client, "v", scale=1.0).status_code == 201
    sha, d = served(client).sha256, served(client).checkpoint.config.d_model
    old = load_vector(vec_dir / "v.safetensors")
    save_vector(vec_dir / "v.safetensors", SteeringVector(**{**old.__dict__, "vector": torch.full((d,), 5.0)}))
    assert store(client).lookup("tiny", sha, "v", FIELD).tolist() == [5.0] * d
    (vec_dir / "v.safetensors").write_bytes(b"garbage")  # broken in place by someone: refused, not served stale
    assert_error(client.get("/steering/vectors/v"), 404)


def test_the_gauge_counts_vectors_per_served_model(client: TestClient, vec_dir: Path) -> None:
    def gauge() -> float:
        return value(parse_metrics(client.get("/metrics").text), "shortcut_steering_vectors", model="tiny")

    assert gauge() == 0
    assert upload(client, "a").status_code == 201 and upload(client, "b").status_code == 201
    assert gauge() == 2
    write_foreign(vec_dir, "foreign", "other", "00" * 32, 4)
    client.get("/steering/vectors")
    samples = parse_metrics(client.get("/metrics").text)
    labels = {dict(lab)["model"] for (n, lab) in samples if n == "shortcut_steering_vectors"}
    assert labels == {"tiny"}  # only served model names are label values
    client.delete("/steering/vectors/a")
    assert gauge() == 1


def post(client: TestClient, **body: object):  # noqa: ANN201
    return client.post("/steering/vectors", json={"name": "v", "layer": 0, **body})


def test_caps_name_their_settings(make_client: MakeClient, vec_dir: Path) -> None:
    client = make_client(
        steering_dir=vec_dir,
        steering_max_vectors=2,
        steering_max_prompts=3,
        steering_max_prompt_bytes=10,
        steering_max_vector_floats=8,
    )
    err = assert_error(post(client, positive=["a"] * 4, negative=["b"]), 400, "too_many_prompts", "positive")
    assert "SHORTCUT_STEERING_MAX_PROMPTS" in err["message"]
    err = assert_error(post(client, positive=["a"], negative=["b"] * 4), 400, "too_many_prompts", "negative")
    err = assert_error(post(client, positive=["a"], negative=["b", "é" * 6]), 413, "prompt_too_large", "negative[1]")
    assert "SHORTCUT_STEERING_MAX_PROMPT_BYTES" in err["message"] and "12 bytes" in err["message"]
    err = assert_error(post(client, vector=[1.0] * 9), 413, "vector_too_large", "vector")
    assert "SHORTCUT_STEERING_MAX_VECTOR_FLOATS" in err["message"]
    assert post(client, name="one", positive=["A"] * 3, negative=["a" * 10]).status_code == 201
    assert post(client, name="two", positive=["B"], negative=["b"]).status_code == 201
    err = assert_error(post(client, name="three", positive=["C"], negative=["c"]), 400, "steering_store_full", "name")
    assert "SHORTCUT_STEERING_MAX_VECTORS=2" in err["message"]
    assert post(client, name="two", positive=["C"], negative=["c"], replace=True).status_code == 201  # room: replaced
    assert client.delete("/steering/vectors/one").status_code == 204
    assert post(client, name="three", positive=["C"], negative=["c"]).status_code == 201


def test_bad_bodies(make_client: MakeClient, vec_dir: Path) -> None:
    client = make_client(steering_dir=vec_dir, steering_max_prompt_bytes=1000)
    d = served(client).checkpoint.config.d_model
    window = served(client).checkpoint.config.block_size
    assert_error(post(client, layer=2, vector=[1.0] * d), 400, "invalid_value", "layer")
    assert_error(post(client, vector=[1.0] * (d + 1)), 400, "invalid_value", "vector")
    assert_error(post(client, positive=["a"], negative=["b" * (window + 1)]), 400, "context_length_exceeded")
    assert_error(post(client, vector=[1e38] * d), 400, "invalid_value", "vector")  # the norm overflows float32
    for body, param in [
        ({}, None),  # neither source
        ({"vector": [1.0] * d, "positive": ["a"], "negative": ["b"]}, None),  # both
        ({"positive": ["a"]}, None),  # half a contrast
        ({"vector": [1.0] * d, "reduce": "mean"}, None),
        ({"positive": ["a"], "negative": ["b"], "reduce": "max"}, "reduce"),
        ({"positive": [], "negative": ["b"]}, "positive"),
        ({"positive": [""], "negative": ["b"]}, "positive.0"),
        ({"positive": [1], "negative": ["b"]}, "positive.0"),
        ({"vector": [True] * d}, "vector.0"),
        ({"vector": ["1.0"] * d}, "vector.0"),
        ({"vector": [1.0] * d, "replace": 1}, "replace"),
        ({"vector": [1.0] * d, "layer": True}, "layer"),
        ({"vector": [1.0] * d, "layer": -1}, "layer"),
        ({"vector": [1.0] * d, "name": "a/b"}, "name"),
        ({"vector": [1.0] * d, "name": ""}, "name"),
        ({"vector": [1.0] * d, "name": "x" * 65}, "name"),
        ({"vector": [1.0] * d, "extra": 1}, "extra"),
    ]:
        assert_error(post(client, **body), 422, param=param)
    r = client.post(
        "/steering/vectors",
        content=b'{"name": "v", "layer": 0, "vector": [NaN' + b", 1.0" * (d - 1) + b"]}",
        headers={"content-type": "application/json"},
    )
    assert_error(r, 422, param="vector.0")
    assert_error(post(client, model="nope", vector=[1.0] * d), 404, "model_not_found", "model")
    assert client.get("/steering/vectors").json() == {"data": []}
    assert os.listdir(vec_dir) == []  # nothing written, no temporary file left
