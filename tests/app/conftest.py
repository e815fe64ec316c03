"""App fixtures: a tiny random checkpoint served by an in-process TestClient, or by a live `python -m app`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.live_server import Server as LiveServer
from tests.live_server import launch as launch_server
from tests.live_server import stop as stop_server


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
