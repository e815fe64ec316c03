"""The server's CPU seconds during the HTTP load."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench import run, servers


def test_cpu_figures() -> None:
    f = run.cpu_figures(tokens=384, wall_s=0.2, server_cpu_s=0.3, main_thread_cpu_s=0.1, client_cpu_s=0.05)
    assert f["tok_per_server_cpu_s"] == pytest.approx(1280.0)
    assert f["server_cores_busy"] == pytest.approx(1.5)
    assert f["server_main_thread_share"] == pytest.approx(1 / 3)
    assert f["server_other_threads_cpu_s"] == pytest.approx(0.2)
    assert run.cpu_figures(10, 0.1, 0.0, 0.0, 0.0)["tok_per_server_cpu_s"] is None


BURN = """
import threading, time
def burn():
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
th = threading.Thread(target=burn)
th.start()
th.join()
print("done", flush=True)
time.sleep(30)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_server_cpu_of_another_process_counts_its_threads() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "done"
        cpu = servers.server_cpu(proc.pid)
        # the burning thread has exited: its 0.3 s still count for the process, not for the main thread
        assert 0.3 <= cpu["total_s"] < 0.3 + 1.0
        assert cpu["main_thread_s"] < cpu["total_s"] - 0.25
        ticks = servers._stat_cpu_s(f"/proc/{proc.pid}/stat")  # the /proc/<pid>/stat fallback, 10 ms ticks
        assert abs(ticks - cpu["total_s"]) < 0.05
        before = servers.process_cpu_s(proc.pid)
        time.sleep(0.2)  # asleep: no CPU
        assert servers.process_cpu_s(proc.pid) - before < 0.02
    finally:
        proc.kill()
        proc.wait()
    assert servers.process_cpu_s(os.getpid()) == pytest.approx(time.process_time(), abs=0.05)
