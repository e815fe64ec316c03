"""Live `python -m app` servers on 127.0.0.1 for tests: launch one with settings, wait for /ready, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    """The environment for `python -m app`: no inherited SHORTCUT_*, one thread, no extras, no drain delay."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHORTCUT_")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p), OMP_NUM_THREADS="1"
    )
    base = {
        "checkpoint": checkpoint,
        "model_name": "tiny",
        "warmup": False,
        "threads": 1,
        "extra_checkpoints_dir": "",
        "log_level": "WARNING",
        "drain_delay_s": 0,  # no balancer in front: SIGTERM drains at once (tests that need the delay set it)
    }
    for k, v in {**base, **settings}.items():
        env[f"SHORTCUT_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


def launch(checkpoint: Path, log_dir: Path, step_delay_s: float = 0.0, **settings: object) -> Server:
    """Start `python -m app` with SHORTCUT_<NAME>=value per setting; return once /ready answers 200.

    With `step_delay_s` > 0 the server is `python -m tests.slow_app`: each decode step takes at least that long.
    """
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    env = server_env(checkpoint, **settings)
    module = "app"
    if step_delay_s > 0:
        module, env["TEST_STEP_DELAY_S"] = "tests.slow_app", str(step_delay_s)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
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


@contextmanager
def server_pool(log_dir: Path, default_checkpoint: Path | None = None) -> Iterator[Callable[..., Server]]:
    """A factory `(checkpoint=None, **settings) -> Server` whose servers are all stopped when the block ends."""
    servers: list[Server] = []

    def start(checkpoint: Path | None = None, **settings: object) -> Server:
        path = checkpoint or default_checkpoint
        if path is None:
            raise ValueError("no checkpoint given and no default")
        servers.append(launch(path, log_dir, **settings))
        return servers[-1]

    try:
        yield start
    finally:
        for s in servers:
            stop(s)
