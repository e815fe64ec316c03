"""Reliability fixtures: live `python -m app` servers (checkpoints, in-process clients: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import SLOW_STEP_S
from tests.live_server import REPO_ROOT, Server, free_port, server_env, server_pool  # noqa: F401 - re-exported

# ---------------------------------------------------------------- live servers


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Factory: start_server(checkpoint, **settings) -> a ready Server; every one is stopped at session end."""
    with server_pool(tmp_path_factory.mktemp("rel_server_logs")) as start:
        yield start


@pytest.fixture(scope="session")
def tiny_server(start_server: Callable[..., Server], app_checkpoint: Path) -> Server:
    """A live server of the tiny checkpoint with default limits, shared by the session (treat as read-only)."""
    return start_server(app_checkpoint)


@pytest.fixture(scope="session")
def slow_server(start_server: Callable[..., Server], slow_checkpoint: Path) -> Server:
    """A live server of the slow checkpoint with one batch row and two queue slots."""
    return start_server(slow_checkpoint, max_batch_size=1, max_queue=2, step_delay_s=SLOW_STEP_S)
