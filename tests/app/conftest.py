"""App fixtures: a tiny random checkpoint served by an in-process TestClient, or by a live `python -m app`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.live_server import Server as LiveServer
from tests.live_server import server_pool


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """A started client with default settings."""
    return make_client()


@pytest.fixture(scope="module")
def start_server(app_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """Factory: start_server(checkpoint=None, **settings) -> a ready LiveServer; all are stopped at module end.

    Settings become environment variables (`max_batch_size=1` -> SHORTCUT_MAX_BATCH_SIZE=1); the default checkpoint
    is `app_checkpoint` served as "tiny", without warm-up, with one thread and no extra checkpoints.
    """
    with server_pool(tmp_path_factory.mktemp("server_logs"), app_checkpoint) as start:
        yield start


@pytest.fixture(scope="module")
def live_server(start_server: Callable[..., LiveServer]) -> str:
    """Base URL (http://127.0.0.1:PORT) of a live server with default test settings, shared by the module."""
    return start_server().url
