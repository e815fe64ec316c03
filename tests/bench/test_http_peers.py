"""HTTP against the best peer (#17): the server's CPU seconds, the ratio arithmetic and the printed report."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

from bench import report, servers
from bench.sections.compare import peer_batches
from bench.sections.served import cpu_figures


def args(**kw: object) -> argparse.Namespace:
    base = dict(batch=32, mid=8, prompt_bytes=64, max_new_tokens=192, sections=["http", "peers"])
    return argparse.Namespace(**{**base, **kw})


METRICS = {
    # c1: wall 3000 tok/s, 2000 per server CPU s; best peer at bs1: int8, 0.25 ms/token = 4000 tok/s
    "http_c1_tok_s": 3000.0,
    "http_c1_tok_per_server_cpu_s": 2000.0,
    "ct2_float32_bs1_cpu_ms_per_token": 0.4,
    "ct2_int8_bs1_cpu_ms_per_token": 0.25,
    "ct2_int8_bs1_decode_cpu_ms_per_token": 0.01,  # decode-only figures must not be the yardstick
    # c8: only float32 ran at bs8: 0.25 ms = 4000 tok/s
    "http_c8_tok_s": 4000.0,
    "http_c8_tok_per_server_cpu_s": 3000.0,
    "ct2_float32_bs8_cpu_ms_per_token": 0.25,
    # c32: best peer float32 0.16 ms = 6250 tok/s (int8 slower here)
    "http_c32_tok_s": 7500.0,
    "http_c32_tok_per_server_cpu_s": 5000.0,
    "ct2_float32_bs32_cpu_ms_per_token": 0.16,
    "ct2_int8_bs32_cpu_ms_per_token": 0.2,
}


def test_http_vs_best_peer_ratios() -> None:
    r = report.ratios(dict(METRICS), args())
    c1, c1_cpu = r["HTTP c1 / best peer bs1"], r["HTTP c1 / best peer bs1 (server CPU)"]
    assert c1["value"] == pytest.approx(0.75) and c1["target"] == 1.0 and c1["ok"] is False
    assert c1["best_peer"] == "ct2_int8" and c1["denominator"] == pytest.approx(4000.0)
    assert c1_cpu["value"] == pytest.approx(0.5) and c1_cpu["ok"] is False
    c32, c32_cpu = r["HTTP c32 / best peer bs32"], r["HTTP c32 / best peer bs32 (server CPU)"]
    assert c32["best_peer"] == "ct2_float32" and c32["denominator"] == pytest.approx(6250.0)
    assert c32["value"] == pytest.approx(1.2) and c32["target"] == 1.2 and c32["ok"] is True
    assert c32_cpu["value"] == pytest.approx(0.8) and c32_cpu["ok"] is False
    c8 = r["HTTP c8 / best peer bs8"]
    assert c8["value"] == pytest.approx(1.0) and c8["target"] is None and c8["ok"] is None
    assert r["HTTP c8 / best peer bs8 (server CPU)"]["value"] == pytest.approx(0.75)
    for k, v in r.items():
        if k.startswith("HTTP c"):
            assert v["higher_is_better"] and "64-token prompts + 192 new tokens" in v["compares"]
    assert "http_c1_tok_s" in c1["compares"] and "http_c1_tok_per_server_cpu_s" in c1_cpu["compares"]
    assert "prefill included" in c1["compares"]


def test_http_vs_peers_without_one_side() -> None:
    no_peers = report.http_vs_peers({k: v for k, v in METRICS.items() if k.startswith("http_")}, args())
    no_http = report.http_vs_peers({k: v for k, v in METRICS.items() if k.startswith("ct2_")}, args())
    for r in (no_peers, no_http):
        assert all(v["value"] is None and v["ok"] is None for v in r.values())
    assert no_peers["HTTP c1 / best peer bs1"]["best_peer"] is None
    assert no_http["HTTP c1 / best peer bs1"]["best_peer"] == "ct2_int8"


def test_quick_sizes_follow_batch_and_mid() -> None:
    r = report.http_vs_peers({"http_c4_tok_s": 100.0, "ct2_int8_bs4_cpu_ms_per_token": 5.0}, args(batch=4, mid=2))
    assert set(r) == {f"HTTP c{c} / best peer bs{c}{s}" for c in (1, 2, 4) for s in ("", " (server CPU)")}
    assert r["HTTP c4 / best peer bs4"]["value"] == pytest.approx(0.5) and r["HTTP c4 / best peer bs4"]["target"] == 1.2


def test_peer_batches_add_mid_only_with_http() -> None:
    assert peer_batches(args()) == (1, 8, 32)
    assert peer_batches(args(sections=["peers"])) == (1, 32)
    assert peer_batches(args(mid=1, batch=1, sections=["http", "peers"])) == (1,)


def test_cpu_figures() -> None:
    f = cpu_figures(tokens=384, wall_s=0.2, server_cpu_s=0.3, main_thread_cpu_s=0.1, client_cpu_s=0.05)
    assert f["tok_per_server_cpu_s"] == pytest.approx(1280.0)
    assert f["server_cores_busy"] == pytest.approx(1.5)
    assert f["server_main_thread_share"] == pytest.approx(1 / 3)
    assert f["server_other_threads_cpu_s"] == pytest.approx(0.2)
    assert cpu_figures(10, 0.1, 0.0, 0.0, 0.0)["tok_per_server_cpu_s"] is None


def fake_result() -> dict:
    a = args()
    m = dict(METRICS)
    level = {"tok_s": 3000.0, "server_cpu_s": 0.192, "tok_per_server_cpu_s": 2000.0, "server_cores_busy": 1.5}
    sweep = [
        {"concurrency": 1, **level, "server_main_thread_share": 0.25, "client_cpu_s": 0.06},
        {"concurrency": 8, "tok_s": 4000.0},  # a level without CPU figures (server pid unknown)
    ]
    return {
        "settings": {"threads": 1, "prompt_bytes": 64, "max_new_tokens": 192},
        "machine": {"loadavg_start": [0.1], "loadavg_end": [0.1], "cpus_available": 2},
        "metrics": m,
        "details": {"http_sweep": sweep},
        "ratios": report.ratios(m, a),
    }


def test_report_shows_the_sweep_and_the_ratios() -> None:
    res = fake_result()
    text = report.render(res)
    lines = text.splitlines()
    row = next(line for line in lines if line.split()[:2] == ["1", "3,000.0"])
    assert row.split() == ["1", "3,000.0", "0.192", "2,000.0", "1.500", "25%", "0.060"]
    assert next(line for line in lines if line.split()[:2] == ["8", "4,000.0"]).split()[2:] == ["-"] * 5
    assert "1 torch thread(s)" in text and "event-loop thread" in text
    c1 = [line for line in lines if line.strip().startswith("c1 ")]
    assert [line.split("=")[1].strip() for line in c1] == ["0.750 (target 1.000: NO)", "0.500 (target 1.000: NO)"]
    assert "by wall" in c1[0] and "ct2_int8" in c1[0] and "4,000.0 tok/s" in c1[0]
    assert "by server CPU" in c1[1] and "2,000.0 tok/s" in c1[1]
    c32 = next(line for line in lines if line.strip().startswith("c32 "))
    assert c32.endswith("= 1.200 (target 1.200: yes)") and "ct2_float32" in c32
    c8 = next(line for line in lines if line.strip().startswith("c8 "))
    assert c8.endswith("= 1.000")  # no target at the middle level
    table = next(line for line in lines if line.startswith("HTTP c8 / best peer bs8 ") and "CPU" not in line)
    assert table.split()[-3:] == ["1.000", "-", "-"]
    assert next(line for line in lines if line.startswith("HTTP c1 / best peer bs1 ")).split()[-4:] == [
        "0.750",
        ">=",
        "1.000",
        "NO",
    ]


def test_report_without_http_or_peers() -> None:
    res = fake_result()
    res["details"] = {}
    res["ratios"] = report.ratios({}, args())
    text = report.render(res)
    assert "HTTP streaming sweep" not in text and "against the best peer in-process" not in text
    res = fake_result()
    res["metrics"] = {k: v for k, v in METRICS.items() if k.startswith("http_")}
    res["ratios"] = report.ratios(res["metrics"], args())
    text = report.render(res)
    assert "HTTP streaming sweep" in text and "against the best peer in-process" not in text


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


def test_peer_thread_check_line() -> None:
    th = {"compute_type": "int8", "bs1_threads1_tok_s": 3460.0, "bs1_threads2_tok_s": 145.0, "bs1_faster_with_2": False}
    th |= {"bs32_threads1_tok_s": 4492.0, "bs32_threads2_tok_s": 1790.0, "bs32_faster_with_2": False}
    line = report.render_ct2_threads(th)
    assert line.endswith("bs1 3,460 / 145; bs32 4,492 / 1,790 (one thread is its best)")
    th |= {"bs32_threads2_tok_s": 9000.0, "bs32_faster_with_2": True}
    assert "faster with 2 at bs32" in report.render_ct2_threads(th)
