"""Hardening (issue #13), in-process: /diagnostics inside the request contract, bodies and methods the README
promises to refuse or serve, the Host check's defaults, and checkpoint headers nested too deeply."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import Callable, Generator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import app.routes.diagnostics as diagnostics_route
from app.connection import LoopErrorLog
from app.middleware import default_allowed_hosts, escape_controls, host_name
from model.checkpoint import CheckpointError, load_checkpoint
from tests.helpers import assert_error

# ---------------------------------------------------------------- /diagnostics: timeout and disconnect


class SlowJob:
    """A stand-in for iter_diagnostics: `steps` slices of `step_s` each; records how far it got and if it was closed."""

    def __init__(self, steps: int = 100, step_s: float = 0.02) -> None:
        self.steps, self.step_s, self.done, self.closed = steps, step_s, 0, False

    def __call__(self, *args: object) -> Generator[None, None, dict]:
        try:
            for _ in range(self.steps):
                time.sleep(self.step_s)
                self.done += 1
                yield
        except GeneratorExit:
            self.closed = True
            raise
        return {"layers": []}


def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_diagnostics_honour_the_request_timeout(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = SlowJob()  # 2 s of work against a 0.2 s timeout
    monkeypatch.setattr(diagnostics_route, "iter_diagnostics", job)
    client = make_client(request_timeout_s=0.2)
    engine = client.app.state.models["tiny"].engine
    err = assert_error(client.get("/diagnostics", params={"prompt": "hello"}), 504, code="request_timeout")
    assert err["type"] == "timeout_error"
    wait_until(lambda: engine.n_jobs == 0)  # the job was dropped, not run to its end
    assert job.closed and job.done < job.steps


def test_diagnostics_job_is_cancelled_when_the_client_leaves(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = SlowJob()
    monkeypatch.setattr(diagnostics_route, "iter_diagnostics", job)
    client = make_client()
    engine = client.app.state.models["tiny"].engine
    sent: list[dict] = []

    async def call() -> None:
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.sleep(0.2)  # the client goes away while its job runs
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/diagnostics",
            "raw_path": b"/diagnostics",
            "root_path": "",
            "query_string": b"prompt=hello",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
        }
        await client.app(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["status"] == 499, sent  # recorded as 499 (nobody reads it)
    wait_until(lambda: engine.n_jobs == 0)
    assert job.closed and job.done < job.steps
    assert client.get("/diagnostics", params={"prompt": "next"}).status_code == 200  # the worker is fine


# ---------------------------------------------------------------- bodies and methods


def test_int_literal_over_4300_digits_gets_the_right_message(client: TestClient) -> None:
    body = b'{"prompt": "hi", "max_new_tokens": ' + b"1" * 5000 + b"}"
    err = assert_error(
        client.post("/generate", content=body, headers={"content-type": "application/json"}), 400, code="invalid_body"
    )
    assert "4300 digits" in err["message"] and "UTF-8" not in err["message"], err


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_bodies_are_400(client: TestClient, encoding: str) -> None:
    body = json.dumps({"prompt": "hi", "max_new_tokens": 1}).encode(encoding)
    err = assert_error(
        client.post("/generate", content=body, headers={"content-type": "application/json"}), 400, code="invalid_body"
    )
    assert "UTF-8" in err["message"]


def test_lone_surrogate_prompt_is_refused_on_completions_too(client: TestClient) -> None:
    for prompt in (b'"\\ud800"', b'["a\\udfff"]'):
        resp = client.post(
            "/v1/completions", content=b'{"prompt": ' + prompt + b"}", headers={"content-type": "application/json"}
        )
        assert_error(resp, 422, code="string_unicode", param="prompt")
    assert_error(
        client.post("/generate", content=b'{"prompt": "\\ud800"}', headers={"content-type": "application/json"}),
        422,
        code="string_unicode",
    )


def test_head_on_probes(client: TestClient) -> None:
    for path in ("/health", "/ready"):
        resp = client.head(path)
        assert resp.status_code == 200, path
        assert resp.content == b""
    assert "head" not in client.get("/openapi.json").json()["paths"]["/health"]  # the schema is unchanged


# ---------------------------------------------------------------- Host check and log escaping


def test_host_check_defaults() -> None:
    assert default_allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1", "127.0.0.1")
    assert "myhost.lan" in default_allowed_hosts("myhost.lan")
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("::") is None  # bound to all: any
    assert host_name("Example.COM:8000") == "example.com"
    assert host_name("[::1]:8000") == "::1" and host_name("localhost") == "localhost"


def test_host_check_in_process(make_client: Callable[..., TestClient]) -> None:
    client = make_client(allowed_hosts="api.example.com,*.example.org")
    assert client.get("/health", headers={"host": "api.example.com"}).status_code == 200
    assert client.get("/health", headers={"host": "a.b.example.org:443"}).status_code == 200
    err = assert_error(client.get("/health", headers={"host": "evil.test"}), 400, code="host_not_allowed")
    assert "SHORTCUT_ALLOWED_HOSTS" in err["message"]
    assert_error(client.get("/health"), 400, code="host_not_allowed")  # TestClient's own `testserver`


def test_escape_controls() -> None:
    assert escape_controls("/x\n2026 INFO\r\x1b[31m\x00\u2028ok é") == "/x\\n2026 INFO\\r\\x1b[31m\\x00\\u2028ok é"


# ---------------------------------------------------------------- checkpoints


def test_deeply_nested_checkpoint_header_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nested.safetensors"
    header = b"[" * 200_000 + b"]" * 200_000
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="nested.safetensors.*nested too deeply"):
        load_checkpoint(path)


def test_loop_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """asyncio reports a failed accept() up to the listen backlog per loop tick when descriptors run out."""
    loop = asyncio.new_event_loop()
    try:
        handler = LoopErrorLog(interval_s=60)
        context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(2048):
                handler(loop, context)
            handler(loop, {"message": "another kind of error"})
        assert [r.getMessage() for r in caplog.records] == [
            "socket.accept() out of system resource",
            "another kind of error",
        ]
        handler._last[context["message"]] -= 61  # the interval passed: the next one says how many were skipped
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            handler(loop, context)
        assert "2047 more since the last report" in caplog.records[-1].getMessage()
    finally:
        loop.close()
