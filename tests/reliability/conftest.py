"""Reliability fixtures: tiny checkpoints, in-process clients and live `python -m app` servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from tests.conftest import build_model
from tests.live_server import REPO_ROOT, Server, free_port, launch, server_env, stop  # noqa: F401 - re-exported

TINY_CONFIG = ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, block_size=64)
# still small, but a 200-token generation takes long enough (~0.5 s) to be caught in flight
SLOW_CONFIG = ModelConfig(n_layer=4, n_head=4, d_model=64, d_ff=256, block_size=256)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint (context window 64)."""
    path = tmp_path_factory.mktemp("rel_ckpt") / "tiny.safetensors"
    save_checkpoint(build_model(TINY_CONFIG, seed=1), path, metadata={"note": "reliability fixture"})
    return path


@pytest.fixture(scope="session")
def slow_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slower random checkpoint (4 layers, width 64, window 256) for requests that must stay in flight."""
    path = tmp_path_factory.mktemp("rel_ckpt_slow") / "slow.safetensors"
    save_checkpoint(build_model(SLOW_CONFIG, seed=2), path, metadata={"note": "reliability slow fixture"})
    return path


def app_settings(checkpoint: Path, **overrides: object) -> Settings:
    """Settings for an in-process app serving `checkpoint` as model "tiny"."""
    base = {"checkpoint": checkpoint, "model_name": "tiny", "warmup": False, "threads": 1,
            "extra_checkpoints_dir": None}
    return Settings(**{**base, **overrides})


@pytest.fixture
def inproc(tiny_ckpt: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory: inproc(checkpoint=None, **settings) -> a started in-process TestClient (lifespan run)."""
    clients: list[TestClient] = []

    def factory(checkpoint: Path | None = None, **overrides: object) -> TestClient:
        client = TestClient(create_app(app_settings(checkpoint or tiny_ckpt, **overrides)),
                            raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield factory
    for c in clients:
        c.__exit__(None, None, None)


# ---------------------------------------------------------------- live servers


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Factory: start_server(checkpoint, **settings) -> a ready Server; every one is stopped at session end."""
    servers: list[Server] = []
    log_dir = tmp_path_factory.mktemp("rel_server_logs")

    def factory(checkpoint: Path, **settings: object) -> Server:
        server = launch(checkpoint, log_dir, **settings)
        servers.append(server)
        return server

    yield factory
    for s in servers:
        stop(s)


@pytest.fixture(scope="session")
def tiny_server(start_server: Callable[..., Server], tiny_ckpt: Path) -> Server:
    """A live server of the tiny checkpoint with default limits, shared by the session (treat as read-only)."""
    return start_server(tiny_ckpt)


@pytest.fixture(scope="session")
def slow_server(start_server: Callable[..., Server], slow_ckpt: Path) -> Server:
    """A live server of the slow checkpoint with one batch row and two queue slots."""
    return start_server(slow_ckpt, max_batch_size=1, max_queue=2)
