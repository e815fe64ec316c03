"""App fixtures: a tiny random checkpoint served by an in-process TestClient, or by a live `python -m app`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from tests.conftest import build_model

APP_CONFIG = ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, block_size=64)
# still small, but a 200-token generation takes long enough (~0.5 s) to be caught in flight
SLOW_CONFIG = ModelConfig(n_layer=4, n_head=4, d_model=64, d_ff=256, block_size=256)
REPO_ROOT = Path(__file__).resolve().parents[2]


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


@dataclass
class LiveServer:
    """A `python -m app` subprocess serving on 127.0.0.1."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        """The server's combined stdout/stderr so far."""
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_value(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def launch_server(checkpoint: Path, log_dir: Path, **settings: object) -> LiveServer:
    """Start `python -m app` with SHORTCUT_<NAME>=value for each setting; return once /ready answers 200."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHORTCUT_")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    base = {"checkpoint": checkpoint, "model_name": "tiny", "warmup": False, "threads": 1,
            "extra_checkpoints_dir": "", "log_level": "WARNING"}
    env.update({f"SHORTCUT_{k.upper()}": _env_value(v) for k, v in {**base, **settings}.items()})
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before it was ready:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    pytest.fail(f"server not ready within 60 s:\n{server.log()}")


def stop_server(server: LiveServer, timeout: float = 20) -> None:
    """SIGTERM (drain), then SIGKILL if it does not exit in time."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


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
