"""/metrics: every metric of the issue is exported, counters move by the right amounts, batching shows up."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import pytest
import torch
from fastapi.testclient import TestClient

from model import tokenizer
from model.checkpoint import load_checkpoint
from tests.helpers import Samples, bucket, parse_metrics, value

ISSUE_METRICS = [
    "shortcut_http_request_duration_seconds",
    "shortcut_e2e_request_latency_seconds",
    "shortcut_time_to_first_token_seconds",
    "shortcut_inter_token_latency_seconds",
    "shortcut_request_queue_time_seconds",
    "shortcut_prompt_tokens_total",
    "shortcut_generation_tokens_total",
    "shortcut_request_success_total",
    "shortcut_requests_running",
    "shortcut_requests_waiting",
    "shortcut_batch_size",
    "shortcut_model_info",
    "shortcut_resid_post_norm",
]
HISTOGRAMS = [
    "shortcut_http_request_duration_seconds",
    "shortcut_e2e_request_latency_seconds",
    "shortcut_time_to_first_token_seconds",
    "shortcut_inter_token_latency_seconds",
    "shortcut_request_queue_time_seconds",
    "shortcut_batch_size",
    "shortcut_resid_post_norm",
]


def scrape(client: TestClient) -> Samples:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return parse_metrics(resp.text)


def test_every_issue_metric_is_exported(client: TestClient, app_checkpoint: Path) -> None:
    client.post("/generate", json={"prompt": "hello", "max_new_tokens": 3})  # histograms with labels need a sample
    text = client.get("/metrics").text
    samples = parse_metrics(text)
    names = {n for n, _ in samples}
    for metric in ISSUE_METRICS:
        if metric in HISTOGRAMS:
            assert {f"{metric}_bucket", f"{metric}_sum", f"{metric}_count"} <= names, metric
            assert f"# TYPE {metric} histogram" in text
        else:
            assert metric in names, metric
    assert "# TYPE shortcut_requests_running gauge" in text
    assert "# TYPE shortcut_prompt_tokens_total counter" in text
    for reason in ("length", "stop", "abort", "timeout", "error"):  # present from the start, at 0 or more
        assert (
            "shortcut_request_success_total",
            frozenset({("model", "tiny"), ("finished_reason", reason)}),
        ) in samples
    sha = hashlib.sha256(app_checkpoint.read_bytes()).hexdigest()
    info = {"model": "tiny", "checkpoint_sha256": sha, "n_layer": "2", "d_model": "16", "device": "cpu"}
    assert samples[("shortcut_model_info", frozenset(info.items()))] == 1


def test_counters_move_by_the_right_amounts(client: TestClient) -> None:
    before = scrape(client)
    prompts = ["hello", "Grüße ✓", "a longer prompt of some bytes"]
    usages, reasons = [], []
    for i, p in enumerate(prompts):
        out = client.post("/generate", json={"prompt": p, "max_new_tokens": 5 + i, "seed": i}).json()
        usages.append(out["usage"])
        reasons.append(out["finish_reason"])
    full = client.post("/generate", json={"prompt": "stop test", "max_new_tokens": 20, "temperature": 0}).json()
    stop = next(full["text"][i : i + 1] for i in range(2, 20) if full["text"][i] not in full["text"][:i])
    out = client.post(
        "/generate", json={"prompt": "stop test", "max_new_tokens": 20, "temperature": 0, "stop": stop}
    ).json()
    assert out["finish_reason"] == "stop"
    usages += [full["usage"], out["usage"]]
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    n = len(usages)
    assert delta("shortcut_prompt_tokens_total") == sum(len(tokenizer.encode(p)) for p in prompts) + 2 * 9
    assert delta("shortcut_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("shortcut_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("shortcut_request_success_total", finished_reason="length") == n - 1
    assert delta("shortcut_request_success_total", finished_reason="stop") == 1
    assert delta("shortcut_request_success_total", finished_reason="abort") == 0
    for h in (
        "shortcut_e2e_request_latency_seconds",
        "shortcut_time_to_first_token_seconds",
        "shortcut_request_queue_time_seconds",
    ):
        assert delta(f"{h}_count") == n, h
    # one inter-token gap per token after a request's first
    assert delta("shortcut_inter_token_latency_seconds_count") == sum(u["completion_tokens"] - 1 for u in usages)
    assert delta("shortcut_resid_post_norm_count", layer="0") == n
    assert delta("shortcut_resid_post_norm_count", layer="1") == n
    assert delta("shortcut_http_request_duration_seconds_count", route="/generate", method="POST", status="200") == n
    assert value(after, "shortcut_requests_running") == 0
    assert value(after, "shortcut_requests_waiting") == 0


@torch.no_grad()
def test_resid_norm_is_the_last_position_norm(client: TestClient, app_checkpoint: Path) -> None:
    prompt = "norms of the residual stream"
    client.post("/generate", json={"prompt": prompt, "max_new_tokens": 1})
    samples = scrape(client)
    model = load_checkpoint(app_checkpoint).model.eval()
    resid = model(torch.tensor([tokenizer.encode(prompt)]), return_resid=True).resid
    for layer, trace in enumerate(resid):
        expected = float(trace["resid_post"][0, -1].norm())
        # the served prefill runs the decode step's float16 weights and cache where it is the fused step (auto)
        assert value(samples, "shortcut_resid_post_norm_sum", layer=str(layer)) == pytest.approx(expected, rel=1e-3)


def test_route_label_is_the_template_not_the_path(client: TestClient) -> None:
    secret = "SECRET-PROMPT-TEXT"
    client.post("/generate", json={"prompt": secret, "max_new_tokens": 1})
    client.get(f"/no/such/{secret}")
    client.get(f"/diagnostics?prompt={secret}")
    text = client.get("/metrics").text
    assert secret not in text
    samples = parse_metrics(text)
    routes = {dict(labels).get("route") for n, labels in samples if n.startswith("shortcut_http_request_duration")}
    assert {"/generate", "/diagnostics", "unmatched"} <= routes
    assert value(samples, "shortcut_http_request_duration_seconds_count", route="unmatched", status="404") == 1


def test_metrics_off_for_resid_norms(make_client: Callable[..., TestClient]) -> None:
    client = make_client(resid_norm_metrics=False)
    client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2})
    assert value(scrape(client), "shortcut_resid_post_norm_count") == 0


def test_concurrent_requests_are_batched(client: TestClient) -> None:
    n = 8
    barrier = Barrier(n)

    def one(i: int) -> dict:
        barrier.wait()
        resp = client.post("/generate", json={"prompt": f"request number {i}", "max_new_tokens": 40, "seed": i})
        assert resp.status_code == 200, resp.text
        return resp.json()

    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(one, range(n)))
    samples = scrape(client)
    total = value(samples, "shortcut_batch_size_count")
    single = bucket(samples, "shortcut_batch_size", "1.0")
    assert total > 0
    assert single < total  # some decode steps ran more than one sequence
    # every token beyond each request's first came from a decode step: sum of batch sizes == those tokens
    assert value(samples, "shortcut_batch_size_sum") == sum(o["usage"]["completion_tokens"] - 1 for o in outs)
    assert value(samples, "shortcut_generation_tokens_total") == n * 40


def test_method_label_is_a_fixed_set(client: TestClient) -> None:
    """Client-chosen methods never become label values (each would add series to every scrape)."""
    for method in ("M0001", "M0002", "X" * 1000, "PATCH", "DELETE"):
        client.request(method, "/health")
    client.head("/health")
    client.options("/generate")
    text = client.get("/metrics").text
    assert "M0001" not in text and "XXXX" not in text
    samples = parse_metrics(text)
    methods = {dict(labels)["method"] for n, labels in samples if n.startswith("shortcut_http_request_duration")}
    assert methods <= {"GET", "POST", "HEAD", "OPTIONS", "other"}
    assert value(samples, "shortcut_http_request_duration_seconds_count", method="other", route="/health") == 5


def test_schema_pages_have_their_own_route_label(client: TestClient) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path).status_code == 200
    samples = scrape(client)
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert value(samples, "shortcut_http_request_duration_seconds_count", route=path, status="200") == 1, path
    assert value(samples, "shortcut_http_request_duration_seconds_count", route="unmatched") == 0


def test_metrics_body_is_built_off_the_event_loop(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large exposition takes time to build; built on the event loop it would stall every stream."""
    import app.routes.health as health

    on_loop: list[bool] = []
    real = health.generate_latest

    def recording(registry: object) -> bytes:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(registry)

    monkeypatch.setattr(health, "generate_latest", recording)
    assert client.get("/metrics").status_code == 200
    assert on_loop == [False]


def test_engine_metrics_are_labelled_by_model(
    make_client: Callable[..., TestClient], app_checkpoint: Path, tmp_path: Path
) -> None:
    """Every served model's engine feeds the metrics, each under its own `model` label."""
    shutil.copy(app_checkpoint, tmp_path / "second.safetensors")
    client = make_client(extra_checkpoints_dir=tmp_path)
    assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 3, "model": "second"}).status_code == 200
    samples = scrape(client)
    assert value(samples, "shortcut_generation_tokens_total", model="second") == 3
    assert value(samples, "shortcut_generation_tokens_total", model="tiny") == 0
    assert value(samples, "shortcut_request_success_total", model="second", finished_reason="length") == 1
    assert value(samples, "shortcut_e2e_request_latency_seconds_count", model="second") == 1
    assert value(samples, "shortcut_resid_post_norm_count", model="second", layer="0") == 1
    for reason in ("length", "stop", "abort", "timeout", "error"):  # both models' series exist from the start
        for model in ("tiny", "second"):
            assert (
                "shortcut_request_success_total",
                frozenset({("model", model), ("finished_reason", reason)}),
            ) in samples
