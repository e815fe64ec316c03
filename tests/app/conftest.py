"""App fixtures: a tiny random checkpoint served by an in-process TestClient, or by a live `python -m app`."""

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
from tests.live_server import Server as LiveServer
from tests.live_server import launch as launch_server
from tests.live_server import stop as stop_server

APP_CONFIG = ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, block_size=64)
# still small, but a 200-token generation takes long enough (~0.5 s) to be caught in flight
SLOW_CONFIG = ModelConfig(n_layer=4, n_head=4, d_model=64, d_ff=256, block_size=256)


@pytest.fixture(scope="session")
def app_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint (context window 64) shared by the app tests."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(build_model(APP_CONFIG, seed=1), path, metadata={"note": "app fixture"})
    return path


@pytest.fixture
def make_client(app_checkpoint: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory: make_client(**settings) -> a started TestClient (lifespan run)."""
    clients: list[TestClient] = []

    def factory(**overrides: object) -> TestClient:
        settings = Settings(**{"checkpoint": app_checkpoint, "model_name": "tiny", "warmup": False, "threads": 1,
                               "extra_checkpoints_dir": None,
                               **overrides})
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield factory
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """A started client with default settings."""
    return make_client()


@pytest.fixture(scope="session")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bigger (still small) random checkpoint with a 256-token window, for tests that need requests in flight."""
    path = tmp_path_factory.mktemp("ckpt_slow") / "slow.safetensors"
    save_checkpoint(build_model(SLOW_CONFIG, seed=2), path, metadata={"note": "slow app fixture"})
    return path


@pytest.fixture(scope="module")
def start_server(app_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """Factory: start_server(checkpoint=None, **settings) -> a ready LiveServer; all are stopped at module end.

    Settings become environment variables (`max_batch_size=1` -> SHORTCUT_MAX_BATCH_SIZE=1); the default checkpoint
    is `app_checkpoint` served as "tiny", without warm-up, with one thread and no extra checkpoints.
    """
    servers: list[LiveServer] = []
    log_dir = tmp_path_factory.mktemp("server_logs")

    def factory(checkpoint: Path | None = None, **settings: object) -> LiveServer:
        server = launch_server(checkpoint or app_checkpoint, log_dir, **settings)
        servers.append(server)
        return server

    yield factory
    for s in servers:
        stop_server(s)


@pytest.fixture(scope="module")
def live_server(start_server: Callable[..., LiveServer]) -> str:
    """Base URL (http://127.0.0.1:PORT) of a live server with default test settings, shared by the module."""
    return start_server().url
