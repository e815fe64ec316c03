"""Start benchmark servers as subprocesses, wait until they are ready, sample their memory and CPU time, stop them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat_cpu_s(path: str) -> float:
    """utime + stime of a /proc/.../stat file, in seconds (clock ticks: 10 ms resolution)."""
    fields = Path(path).read_text().rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of proc(5)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far, all its threads, exited ones included.

    Read from the process's POSIX CPU clock (`clock_getcpuclockid`, nanoseconds) where the C library has it: a
    batch-1 HTTP level lasts ~0.1 s, so /proc/<pid>/stat's utime + stime in 10 ms ticks (the fallback) would be off
    by up to 10%."""
    try:
        clock = ctypes.c_int()
        if ctypes.CDLL(None).clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
            return time.clock_gettime(clock.value)
    except (OSError, AttributeError):
        pass
    return _stat_cpu_s(f"/proc/{pid}/stat")


def thread_cpu_s(pid: int, tid: int) -> float:
    """CPU seconds thread `tid` of process `pid` has used so far: /proc/<pid>/task/<tid>/schedstat's time on the CPU
    (nanoseconds), else the task's stat utime + stime (ticks)."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return _stat_cpu_s(f"/proc/{pid}/task/{tid}/stat")


def server_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server process (`total_s`) and of its main thread (`main_thread_s`): in
    `python -m app` the main thread runs the event loop (uvicorn, FastAPI, SSE), the engine decodes on its own."""
    return {"total_s": process_cpu_s(pid), "main_thread_s": thread_cpu_s(pid, pid)}


class RssSampler:
    """Samples a process's resident set size (and, less often, its unique set size) on a thread; keeps the peaks.

    RSS counts the shared libraries' resident pages too (about 200 MB for torch alone); USS is the memory only
    this process holds, what a second replica would add.
    """

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_uss_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                rss = self._proc.memory_info().rss
                if self.samples % 10 == 0:
                    self.peak_uss_bytes = max(self.peak_uss_bytes, self._proc.memory_full_info().uss)
            except psutil.Error:
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def start(self) -> RssSampler:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(2.0)


@dataclass
class Server:
    """A running server subprocess."""

    name: str
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    rss: RssSampler | None = None
    started_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def cpu(self) -> dict[str, float]:
        """CPU seconds the server process (and its main thread) has used so far (`server_cpu`)."""
        return server_cpu(self.proc.pid)

    def log_tail(self, n: int = 30) -> str:
        """The last lines of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _wait_ready(server: Server, path: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < end:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(server.base_url + path).status_code == 200:
                    return
            time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def serve(
    name: str, args: list[str], env: dict[str, str], port: int, ready_path: str, timeout_s: float = 180.0
) -> Iterator[Server]:
    """Run `python ARGS` from the repository root until the block ends; yields once `ready_path` answers 200."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SHORTCUT_")}  # reproducible settings
    full_env = {**inherited, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    log_file = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    server = Server(name=name, proc=proc, base_url=f"http://127.0.0.1:{port}", log_path=Path(log_file.name))
    try:
        server.rss = RssSampler(proc.pid).start()
        _wait_ready(server, ready_path, timeout_s)
        server.started_s = time.perf_counter() - t0
        yield server
    finally:
        if server.rss is not None:
            server.rss.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # our server drains on the first signal; the idle server exits at once
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log_file.close()
        with contextlib.suppress(OSError):
            os.unlink(log_file.name)


def shortcut_server(
    checkpoint: Path, threads: int, max_batch_size: int, resid_norm_metrics: bool = True, name: str = "shortcut"
) -> contextlib.AbstractContextManager[Server]:
    """`python -m app` serving `checkpoint` alone on a free port."""
    port = free_port()
    env = {
        "SHORTCUT_CHECKPOINT": str(checkpoint),
        "SHORTCUT_PORT": str(port),
        "SHORTCUT_HOST": "127.0.0.1",
        "SHORTCUT_EXTRA_CHECKPOINTS_DIR": "",
        "SHORTCUT_MAX_BATCH_SIZE": str(max_batch_size),
        "SHORTCUT_THREADS": str(threads),
        "SHORTCUT_LOG_LEVEL": "WARNING",
        "SHORTCUT_REQUEST_TIMEOUT_S": "3600",
        "SHORTCUT_MAX_QUEUE": "1024",
        "SHORTCUT_RESID_NORM_METRICS": "true" if resid_norm_metrics else "false",
        # the fused step's threads and weights: the server's defaults unless the bench is told otherwise
        "SHORTCUT_DECODE_THREADS": os.environ.get("BENCH_DECODE_THREADS", "0"),
        "SHORTCUT_DECODE_WEIGHTS": os.environ.get("BENCH_DECODE_WEIGHTS", "auto"),
    }
    return serve(name, ["-m", "app", "--host", "127.0.0.1", "--port", str(port)], env, port, "/ready")


def naive_server(checkpoint: Path, threads: int) -> contextlib.AbstractContextManager[Server]:
    """`python -m bench.naive_server`: HF generate per request, on a free port."""
    port = free_port()
    args = ["-m", "bench.naive_server", "--checkpoint", str(checkpoint), "--port", str(port), "--threads", str(threads)]
    return serve("naive", args, {}, port, "/health")
