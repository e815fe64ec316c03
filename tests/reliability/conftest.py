"""Reliability fixtures: tiny checkpoints, in-process clients and live `python -m app` servers on 127.0.0.1."""

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

REPO_ROOT = Path(__file__).resolve().parents[2]
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


@dataclass
class Server:
    """A `python -m app` subprocess on 127.0.0.1."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        """Combined stdout/stderr so far."""
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(checkpoint: Path, **settings: object) -> dict[str, str]:
    """The environment for `python -m app`: no inherited SHORTCUT_*, one thread, no extra checkpoints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHORTCUT_")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    base = {"checkpoint": checkpoint, "model_name": "tiny", "warmup": False, "threads": 1,
            "extra_checkpoints_dir": "", "log_level": "WARNING"}
    for k, v in {**base, **settings}.items():
        env[f"SHORTCUT_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


def launch(checkpoint: Path, log_dir: Path, **settings: object) -> Server:
    """Start `python -m app` with SHORTCUT_<NAME>=value per setting; return once /ready answers 200."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO_ROOT, env=server_env(checkpoint, **settings), stdout=log,
                                stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before it was ready:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop(server)
    pytest.fail(f"server not ready within 90 s:\n{server.log()}")


def stop(server: Server, timeout: float = 20) -> int:
    """SIGTERM (drain), then SIGKILL if it does not exit in time; return the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


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
