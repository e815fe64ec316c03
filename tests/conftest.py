"""Shared fixtures: tiny seeded models, tiny checkpoint files, in-process app clients and generated training text."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from app.settings import Settings

# ---------------------------------------------------------------- CI gates: skip -> fail

# Where CI sets one of these to 1 (.ci/run), a test that skips for one of its reasons fails instead: the peer tests
# (the bench extra: transformers, CTranslate2) and the fused C step's tests must run in CI, not skip silently.
# (TEST_REQUIRE_BROWSER is tests/app/test_page.py's own.)
REQUIRED_SKIPS = {
    "TEST_REQUIRE_BENCH": ("could not import 'transformers'", "could not import 'ctranslate2'"),
    "TEST_REQUIRE_FUSED": (
        "the fused step is not built",
        "cannot run the avx2 build",
        "CPU without AVX2",
        "no C compiler",
    ),
}


def required_skip(reason: str) -> str | None:
    """The gate (an environment variable set to 1) that forbids skipping for `reason`, else None."""
    for env, reasons in REQUIRED_SKIPS.items():
        if os.environ.get(env) == "1" and any(r in reason for r in reasons):
            return env
    return None


def _fail_required_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        env = required_skip(reason)
        if env is not None:
            report.outcome = "failed"
            report.longrepr = f"{env}=1: CI must run this test, but it skipped ({reason})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    _fail_required_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield  # a module-level importorskip skips at collection
    _fail_required_skip(outcome.get_result())  # type: ignore[attr-defined]


# ---------------------------------------------------------------- models, checkpoints, clients

TINY = dict(block_size=32, n_layer=3, n_head=4, d_model=32, d_ff=64)
# served by the app and reliability tests: a context window of 64
APP_CONFIG = ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, block_size=64)
# still small, but a 200-token generation takes long enough (~0.5 s) to be caught in flight
SLOW_CONFIG = ModelConfig(n_layer=4, n_head=4, d_model=64, d_ff=256, block_size=256)
SLOW_STEP_S = 0.005  # live servers of the slow checkpoint hold each decode step this long (tests/slow_app.py)


@pytest.fixture
def tiny_config() -> ModelConfig:
    """A 3-layer, 32-wide config with a 32-byte context."""
    return ModelConfig(**TINY)


def build_model(config: ModelConfig | None = None, seed: int = 0, scale: float | None = 0.3) -> Transformer:
    """A seeded model in eval mode.

    With `scale`, every weight is redrawn as N(0, scale) (LayerNorm gains as 1 + N(0, scale)) so that outputs depend
    strongly on context and equivalence tests can fail; `scale=None` keeps the training initialisation.
    """
    torch.manual_seed(seed)
    model = Transformer(config or ModelConfig(**TINY))
    if scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0.0, scale)
                if ("ln_" in name) and name.endswith("weight"):
                    p.add_(1.0)
    return model.eval()


@pytest.fixture
def make_model() -> Callable[..., Transformer]:
    """Factory: make_model(config=None, seed=0, scale=0.3) -> tiny Transformer in eval mode."""
    return build_model


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> Transformer:
    """The tiny config with large random weights (see `build_model`), in eval mode."""
    return build_model(tiny_config)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_model: Transformer) -> Path:
    """`tiny_model` saved as a checkpoint file with metadata {'note': 'fixture'}."""
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_model, path, metadata={"note": "fixture"})
    return path


def make_text(n_bytes: int = 6000, seed: int = 0) -> str:
    """Deterministic easy-to-learn text: pangram-like sentences with a little variation, plus some non-ASCII."""
    gen = torch.Generator().manual_seed(seed)
    subjects = ["the quick brown fox", "a lazy dog", "the small cat", "my old friend", "ein grüner Baum"]
    verbs = ["jumps over", "looks at", "runs past", "sleeps near", "sieht"]
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        s = subjects[int(torch.randint(len(subjects), (1,), generator=gen))]
        v = verbs[int(torch.randint(len(verbs), (1,), generator=gen))]
        o = subjects[int(torch.randint(len(subjects), (1,), generator=gen))]
        line = f"{s} {v} {o}. "
        parts.append(line)
        size += len(line.encode())
    return "".join(parts).encode()[:n_bytes].decode("utf-8", errors="ignore")


@pytest.fixture
def pattern_text() -> str:
    """About 6 KB of repetitive generated text (the fixed seed makes it identical in every test)."""
    return make_text()


@pytest.fixture(scope="session")
def shared_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make_text()` written once per session; treat it as read-only."""
    path = tmp_path_factory.mktemp("shared") / "data.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture
def text_file(tmp_path: Path, pattern_text: str) -> Path:
    """`pattern_text` written to tmp_path/data.txt."""
    path = tmp_path / "data.txt"
    path.write_text(pattern_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def app_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint (`APP_CONFIG`, context window 64) shared by the app and reliability tests."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(build_model(APP_CONFIG, seed=1), path, metadata={"note": "app fixture"})
    return path


@pytest.fixture(scope="session")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bigger (still small) random checkpoint with a 256-token window, for tests that need requests in flight."""
    path = tmp_path_factory.mktemp("ckpt_slow") / "slow.safetensors"
    save_checkpoint(build_model(SLOW_CONFIG, seed=2), path, metadata={"note": "slow app fixture"})
    return path


def app_settings(checkpoint: Path, **overrides: object) -> Settings:
    """Settings for an in-process app serving `checkpoint` as model "tiny": no warm-up, one thread, no extras, any
    Host header (in-process clients send their own, e.g. TestClient's `testserver`; live servers keep the default)."""
    from app.settings import Settings

    base = {
        "checkpoint": checkpoint,
        "model_name": "tiny",
        "warmup": False,
        "threads": 1,
        "extra_checkpoints_dir": None,
        "allowed_hosts": ("*",),
    }
    return Settings(**{**base, **overrides})


@pytest.fixture
def make_client(app_checkpoint: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory: make_client(checkpoint=None, **settings) -> a started TestClient (lifespan run), closed at teardown."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    clients: list[TestClient] = []

    def factory(checkpoint: Path | None = None, **overrides: object) -> TestClient:
        client = TestClient(
            create_app(app_settings(checkpoint or app_checkpoint, **overrides)), raise_server_exceptions=False
        )
        client.__enter__()
        clients.append(client)
        return client

    yield factory
    for c in clients:
        c.__exit__(None, None, None)
