"""lm-evaluation-harness (`lm_eval`, model "local-completions") against a live server, as a user runs it (issue
#25): it finds the byte tokenizer through vLLM's routes (/tokenizer_info, /tokenize, /detokenize), runs a local
multiple-choice (loglikelihood) task and a local generate_until task (tests/app/lm_eval_tasks/, no Hub access),
with tokenized requests and without, several requests per batch; every score equals what /v1/completions gives."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import REPO_ROOT, Server

TASKS = REPO_ROOT / "tests" / "app" / "lm_eval_tasks"
WINDOW = 64  # tests/conftest.py APP_CONFIG


@pytest.fixture(scope="module")
def lm_eval_env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """lm_eval imported offline, its datasets cache in a temporary folder."""
    cache = tmp_path_factory.mktemp("hf_cache")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache), "HF_DATASETS_CACHE": str(cache)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import lm_eval
    from lm_eval.tasks import TaskManager

    yield lm_eval, TaskManager(include_path=str(TASKS))
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def echo_score(url: str, context: str, continuation: str) -> float:
    """The continuation's loglikelihood from /v1/completions: the prompt scored with echo, max_tokens 0."""
    body = {"model": "tiny", "prompt": context + continuation, "max_tokens": 0, "echo": True, "logprobs": 1}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    lps = resp.json()["choices"][0]["logprobs"]["token_logprobs"]
    return sum(lps[len(context.encode()) :])


def greedy(url: str, context: str) -> str:
    body = {"model": "tiny", "prompt": context, "max_tokens": 8, "temperature": 0, "stop": ["\n"]}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_scores_equal_the_servers(
    tokenized: bool, lm_eval_env: Any, start_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    lm_eval, task_manager = lm_eval_env
    url = start_server().url
    monkeypatch.chdir(REPO_ROOT)  # the task files name their data relative to the repository root
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"model=tiny,base_url={url}/v1/completions,max_length={WINDOW},tokenized_requests={tokenized},"
            "num_concurrent=1,max_retries=1,timeout=60"
        ),  # tokenizer_backend left to lm_eval ("auto"): it must find the server's own
        tasks=["shortcut_mc", "shortcut_gen"],
        task_manager=task_manager,
        batch_size=4,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    assert out is not None
    assert out["config"]["model_args"].startswith("model=tiny")
    mc = out["samples"]["shortcut_mc"]
    assert len(mc) == 8
    compared = 0
    for sample in mc:
        for (context, continuation), [(ll, _)] in zip(sample["arguments"], sample["resps"], strict=True):
            assert ll == echo_score(url, context, continuation), (context, continuation)
            compared += 1
    assert compared == 24
    acc = out["results"]["shortcut_mc"]["acc,none"]
    assert acc == sum(s["acc"] for s in mc) / len(mc)
    gen = out["samples"]["shortcut_gen"]
    assert len(gen) == 5
    for sample in gen:
        context = sample["arguments"][0][0]
        assert sample["resps"][0][0] == greedy(url, context)
    assert "exact_match,none" in out["results"]["shortcut_gen"]


def test_lm_eval_finds_the_remote_tokenizer(live_server: str) -> None:
    """lm-eval's own check (check_remote_tokenizer_support) and tokenizer (RemoteTokenizer) work against the server."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    assert check_remote_tokenizer_support(f"{live_server}/v1/completions")
    tok = RemoteTokenizer(f"{live_server}/v1/completions")
    assert tok.encode("té") == list("té".encode())
    assert tok.decode([116, 101]) == "te"
    assert tok.eos_token is None and tok.eot_token is None
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == "USER:\nHi\n\nASSISTANT:\n"


def test_task_files_are_local() -> None:
    for path in TASKS.glob("*.yaml"):
        text = path.read_text()
        assert "dataset_path: json" in text and "data_files" in text, path
        data = text.split("test: ", 1)[1].split()[0]
        assert (REPO_ROOT / data).is_file(), data
    assert Path(TASKS / "mc.jsonl").read_text().count("\n") == 8
