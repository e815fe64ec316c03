"""App fixtures: a tiny random checkpoint served by an in-process TestClient."""

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

APP_CONFIG = ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, block_size=64)


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
