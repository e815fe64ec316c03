"""Issue #24 item 4 and small items, in process: the answer-size cap (413) and its cost model checked against the
measured size of real answers; big answers built off the event loop unchanged; rows that can never fit the queue are
a 400; a client leaving a non-streamed n=4 request leaves no unretrieved gather exception."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import app.generation as generation
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.engine import SamplingParams
from tests.conftest import build_model
from tests.helpers import assert_error

DEEP = ModelConfig(n_layer=12, n_head=2, d_model=16, d_ff=32, block_size=64)  # many layers: traces weigh


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("deep") / "deep.safetensors"
    save_checkpoint(build_model(DEEP, seed=3), path)
    return path


def params_of(body: dict[str, Any], default_max: int) -> SamplingParams:
    """What the cost model is given for one row of these test bodies (independently of the routes)."""
    return SamplingParams(
        max_new_tokens=body.get("max_tokens", body.get("max_new_tokens", default_max)),
        logprobs=body.get("logprobs") or body.get("top_logprobs") or 0,
        trace=body.get("trace", False),
        logit_lens_top=body.get("logit_lens_top", 0),
    )


CASES = [  # (path, body, rows, echoed prompt tokens per row, repeat)
    ("/generate", {"prompt": "ROMEO:", "max_new_tokens": 40}, 1, 0, 1),
    ("/generate", {"prompt": "ROMEO:", "max_new_tokens": 40, "stream": True, "logprobs": 5}, 1, 0, 2),
    (
        "/generate",
        {"prompt": "ROMEO:", "max_new_tokens": 40, "stream": True, "trace": True, "logit_lens_top": 5, "logprobs": 5},
        1,
        0,
        2,
    ),
    (
        "/v1/completions",
        {"prompt": "ROMEO:", "n": 3, "max_tokens": 40, "trace": True, "logit_lens_top": 5, "logprobs": 5, "echo": True},
        3,
        6,
        1,
    ),
    (
        "/v1/completions",
        {"prompt": "ROMEO:", "n": 3, "max_tokens": 40, "stream": True, "trace": True, "logit_lens_top": 5},
        3,
        0,
        1,
    ),
    ("/v1/completions", {"prompt": ["\u0000\u0001", "\u2028"], "n": 2, "max_tokens": 40, "stream": True}, 4, 0, 1),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "n": 2,
            "max_tokens": 30,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 5,
            "trace": True,
            "logit_lens_top": 5,
        },
        2,
        0,
        1,
    ),
]


@pytest.mark.parametrize(("path", "body", "rows", "echoed", "repeat"), CASES)
def test_the_cost_model_bounds_the_measured_answer(
    make_client: Callable[..., TestClient],
    deep_checkpoint: Path,
    path: str,
    body: dict[str, Any],
    rows: int,
    echoed: int,
    repeat: int,
) -> None:
    """Sampled at temperature 1 so no stop ends a row early: the answer's bytes are at most the estimate."""
    client = make_client(deep_checkpoint)
    body = {**body, "temperature": 1.0, "seed": 7}
    if path.startswith("/v1/chat"):
        body["top_logprobs"] = body.get("top_logprobs")
    resp = client.post(path, json=body)
    assert resp.status_code == 200, resp.text
    params = params_of(body, 0)
    estimate = generation.answer_bytes([(params, echoed)] * rows, DEEP.n_layer, repeat)
    assert len(resp.content) <= estimate, (len(resp.content), estimate)


def test_an_answer_over_the_cap_is_413_naming_the_setting(
    make_client: Callable[..., TestClient], deep_checkpoint: Path
) -> None:
    client = make_client(deep_checkpoint, max_answer_bytes=100_000)
    body = {"prompt": "ROMEO:", "n": 4, "max_tokens": 40, "trace": True, "logit_lens_top": 5}
    err = assert_error(client.post("/v1/completions", json=body), 413, code="answer_too_large")
    assert "SHORTCUT_MAX_ANSWER_BYTES" in err["message"] and "100000" in err["message"]
    assert_error(
        client.post("/generate", json={"prompt": "a", "max_new_tokens": 60, "trace": True, "logit_lens_top": 5}),
        413,
        code="answer_too_large",
    )
    # the same without the trace fits
    assert client.post("/v1/completions", json={**body, "trace": False, "logit_lens_top": 0}).status_code == 200


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("id", "created", "timings")}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_an_answer_built_off_the_loop_is_the_same_answer(
    make_client: Callable[..., TestClient], deep_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    client = make_client(deep_checkpoint)
    if path == "/v1/chat/completions":
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 3}
    else:
        body = {"prompt": "ROMEO:", "logprobs": 3}
    body.update(
        seed=5,
        temperature=1.0,
        trace=True,
        logit_lens_top=2,
        **{"max_new_tokens" if path == "/generate" else "max_tokens": 20},
    )
    calls: list[int] = []
    real = generation.anyio.to_thread.run_sync

    async def counted(fn: Callable[[], Any], *a: Any, **kw: Any) -> Any:
        calls.append(1)
        return await real(fn, *a, **kw)

    monkeypatch.setattr(generation, "OFF_LOOP_BYTES", 10**12)
    on_loop = client.post(path, json=body)
    monkeypatch.setattr(generation, "OFF_LOOP_BYTES", 0)
    monkeypatch.setattr(generation.anyio.to_thread, "run_sync", counted)
    off_loop = client.post(path, json=body)
    assert on_loop.status_code == off_loop.status_code == 200
    assert calls == [1]  # the second was built on a worker thread
    assert off_loop.headers["content-type"] == on_loop.headers["content-type"]
    assert _comparable(off_loop.json()) == _comparable(on_loop.json())


def test_more_rows_than_the_queue_holds_is_400_not_429(make_client: Callable[..., TestClient]) -> None:
    """SHORTCUT_MAX_QUEUE 2 and n=4 on an idle server: it can never fit, so retrying (429) would never help."""
    client = make_client(max_queue=2)
    err = assert_error(
        client.post("/v1/completions", json={"prompt": "a", "n": 4, "max_tokens": 2}), 400, code="request_too_large"
    )
    assert "SHORTCUT_MAX_QUEUE" in err["message"]
    assert client.post("/v1/completions", json={"prompt": "a", "n": 2, "max_tokens": 2}).status_code == 200
    client0 = make_client(max_queue=0)
    assert_error(client0.post("/generate", json={"prompt": "a", "max_new_tokens": 2}), 400, code="request_too_large")


class _Gone:
    """A request whose client has already left (its receive says http.disconnect)."""

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.disconnect"}


class _Never:
    """A handle whose result never comes (a row still generating); cancel is recorded."""

    def __init__(self) -> None:
        self.cancelled = False

    async def result(self) -> Any:
        await asyncio.Event().wait()

    def cancel(self) -> None:
        self.cancelled = True


def test_a_client_leaving_a_non_streamed_n4_request_leaves_no_unretrieved_exception() -> None:
    reported: list[dict[str, Any]] = []

    async def main() -> list[bool]:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        handles = [_Never() for _ in range(4)]
        with pytest.raises(generation.APIError) as e:
            await generation.collect(_Gone(), handles)  # type: ignore[arg-type]
        assert e.value.status == 499
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        return [h.cancelled for h in handles]

    assert asyncio.run(main()) == [True] * 4
    gc.collect()
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], [c["message"] for c in reported]


def test_stream_sse_payload_sizes_are_json(make_client: Callable[..., TestClient]) -> None:
    """(Sanity of the measurement above: a streamed answer is the bytes the client reads.)"""
    client = make_client()
    resp = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True})
    lines = [ln for ln in resp.text.splitlines() if ln.startswith("data: {")]
    assert lines and all(json.loads(ln[6:]) for ln in lines)
