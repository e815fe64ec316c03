"""Test helpers: SSE parsing, Prometheus scraping and polling, the standard error shape."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ERROR_FIELDS = {"message", "type", "param", "code"}


def run_job(gen: Any, between: Callable[[], object] | None = None) -> tuple[Any, int]:
    """Drive a job generator to its end as the engine's worker does, calling `between` (e.g. another forward, a
    decode step's stand-in) after each slice: (its return value, how many times it yielded)."""
    yields = 0
    while True:
        try:
            assert next(gen) is None  # a slice hands nothing to the worker
        except StopIteration as stop:
            return stop.value, yields
        yields += 1
        if between is not None:
            between()


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """Split a Server-Sent Events body into (event, data) pairs; `data` is JSON-decoded unless it is [DONE]."""
    out: list[tuple[str, Any]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event, data_lines = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data_lines.append(value)
        data = "\n".join(data_lines)
        out.append((event, data if data == "[DONE]" else json.loads(data)))
    return out


Samples = dict[tuple[str, frozenset], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> {(sample name, frozenset(labels)): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def scrape(url: str) -> Samples:
    """GET `url`/metrics of a live server, parsed."""
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def wait_for(url: str, predicate: Callable[[Samples], bool], timeout: float = 30) -> Samples:
    """Poll a live server's /metrics until `predicate` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"metrics never reached the expected state: {sorted(samples.items())[-40:]}")
        time.sleep(0.02)


def idle(s: Samples) -> bool:
    """No request running or waiting."""
    return value(s, "shortcut_requests_running") == 0 and value(s, "shortcut_requests_waiting") == 0


def bucket(samples: Samples, name: str, le: str, **labels: str) -> float:
    """The cumulative count of histogram `name` at bucket `le` (e.g. '1.0')."""
    return value(samples, f"{name}_bucket", le=le, **labels)


def assert_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """Assert the standard error shape {"error": {message, type, param, code}}; return the inner object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == ERROR_FIELDS
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err
