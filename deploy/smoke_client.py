"""HTTP checks for deploy/compose-smoke.sh (standard library only: it runs on the host, outside the venv).

Each subcommand prints what it saw and exits 0 when the check holds, 1 otherwise:
  wait     BASE_URL PATH [--timeout S]        poll until GET PATH answers 200
  generate BASE_URL                           POST /generate, check the response shape
  diagnostics BASE_URL                        GET /diagnostics?format=text
  prometheus PROM_URL                         target up, latency histograms counted, rules loaded and evaluated
  drain    BASE_URL -- STOP_COMMAND...        long /generate requests in flight, run STOP_COMMAND (it sends
                                              SIGTERM), every request must still finish with 200
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

PROMPT = "ROMEO:\nBut soft, what light"
FINISHED = {"length", "stop"}
REFUSED = -1  # http() status: nobody listening (never admitted); 0: the connection broke or timed out


def http(method: str, url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """(status, body) of one request; status 0 when the connection itself failed."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        refused = isinstance(getattr(e, "reason", e), ConnectionRefusedError)
        return (REFUSED if refused else 0), str(e).encode()


def get_json(url: str, timeout: float = 10.0) -> Any:
    """GET url, parse JSON; None on any failure."""
    status, body = http("GET", url, timeout=timeout)
    if status != 200:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def fail(msg: str) -> int:
    print(f"  {msg}")
    return 1


# ---- api -------------------------------------------------------------------------------------------------------
def cmd_wait(base: str, path: str, timeout: float) -> int:
    deadline, last = time.monotonic() + timeout, (0, b"")
    while time.monotonic() < deadline:
        last = http("GET", base + path, timeout=5)
        if last[0] == 200:
            print(f"  GET {path} -> 200")
            return 0
        time.sleep(1)
    return fail(f"GET {path} never answered 200 in {timeout:.0f}s (last: {last[0]} {last[1][:200]!r})")


def generate(base: str, max_new_tokens: int, seed: int = 1234, timeout: float = 120) -> tuple[int, dict, float]:
    """POST /generate; (status, parsed body or {}, seconds)."""
    body = {"prompt": PROMPT, "max_new_tokens": max_new_tokens, "temperature": 0.8, "seed": seed, "stream": False}
    t0 = time.monotonic()
    status, raw = http("POST", base + "/generate", body, timeout=timeout)
    elapsed = time.monotonic() - t0
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = {"raw": raw[:300].decode(errors="replace")}
    return status, parsed if isinstance(parsed, dict) else {"raw": parsed}, elapsed


def check_generation(status: int, out: dict) -> str | None:
    """Why a /generate answer is wrong, or None."""
    if status != 200:
        return f"status {status}: {json.dumps(out)[:300]}"
    if not isinstance(out.get("text"), str):
        return f"no text in {json.dumps(out)[:300]}"
    if out.get("finish_reason") not in FINISHED:
        return f"finish_reason {out.get('finish_reason')!r}"
    if not isinstance(out.get("usage"), dict):
        return "no usage object"
    return None


def cmd_generate(base: str) -> int:
    status, out, elapsed = generate(base, 24)
    problem = check_generation(status, out)
    if problem:
        return fail(f"/generate: {problem}")
    print(
        f"  /generate -> 200 in {elapsed:.2f}s, finish_reason={out['finish_reason']}, usage={out['usage']}, "
        f"text={out['text'][:60]!r}"
    )
    status2, out2, _ = generate(base, 24)
    if status2 == 200 and out2.get("text") != out["text"]:
        return fail("same prompt and seed gave different text")
    print("  same seed -> same text")
    return 0


def cmd_diagnostics(base: str) -> int:
    query = urllib.parse.urlencode({"prompt": PROMPT, "format": "text"})
    status, body = http("GET", f"{base}/diagnostics?{query}", timeout=60)
    if status != 200 or not body.strip():
        return fail(f"/diagnostics -> {status} {body[:300]!r}")
    text = body.decode(errors="replace")
    print(f"  /diagnostics -> 200, {len(text.splitlines())} lines; first: {text.splitlines()[0][:100]!r}")
    return 0


# ---- prometheus ------------------------------------------------------------------------------------------------
def prom_query(prom: str, expr: str) -> list[dict] | None:
    out = get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if not out or out.get("status") != "success":
        return None
    return out["data"]["result"]


def prom_value(prom: str, expr: str) -> float | None:
    result = prom_query(prom, expr)
    return float(result[0]["value"][1]) if result else None


def cmd_prometheus(prom: str, timeout: float) -> int:
    checks = {
        'up{job="shortcut-api"}': lambda v: v == 1,
        'sum(shortcut_http_request_duration_seconds_count{job="shortcut-api"})': lambda v: v > 0,
        'sum(shortcut_e2e_request_latency_seconds_count{job="shortcut-api"})': lambda v: v > 0,
        'sum(shortcut_time_to_first_token_seconds_count{job="shortcut-api"})': lambda v: v > 0,
        'sum(shortcut_inter_token_latency_seconds_count{job="shortcut-api"})': lambda v: v > 0,
        'sum(shortcut_resid_post_norm_count{job="shortcut-api"})': lambda v: v > 0,
    }
    deadline = time.monotonic() + timeout
    pending = dict(checks)
    while pending and time.monotonic() < deadline:
        for expr, ok in list(pending.items()):
            v = prom_value(prom, expr)
            if v is not None and ok(v):
                print(f"  {expr} = {v:g}")
                del pending[expr]
        if pending:
            time.sleep(2)
    if pending:
        return fail("not satisfied: " + "; ".join(f"{e} = {prom_value(prom, e)}" for e in pending))
    return 0


def prom_rules(prom: str) -> list[dict] | None:
    out = get_json(f"{prom}/api/v1/rules")
    if not out or out.get("status") != "success":
        return None
    return [r for g in out["data"]["groups"] for r in g["rules"]]


def cmd_rules(prom: str, timeout: float) -> int:
    """Every rule loaded and healthy once evaluated; the latency quantile series exist (NaN while idle is fine)."""
    names = [
        "job:shortcut_e2e_request_latency_seconds:p95_5m",
        "job:shortcut_time_to_first_token_seconds:p50_5m",
        "job:shortcut_inter_token_latency_seconds:p99_5m",
    ]
    deadline, rules, results = time.monotonic() + timeout, None, {}
    while time.monotonic() < deadline:
        rules = prom_rules(prom)
        results = {n: prom_query(prom, n) for n in names}
        if rules and all(r.get("health") == "ok" for r in rules) and all(results.values()):
            print(f"  {len(rules)} recording rules loaded, all healthy")
            for n, r in results.items():
                print(f"  {n} = {r[0]['value'][1]}")
            return 0
        time.sleep(3)
    if not rules:
        return fail("no rules loaded (check rule_files and the rules.yml mount)")
    bad = [f"{r.get('name')}: {r.get('health')} {r.get('lastError', '')}" for r in rules if r.get("health") != "ok"]
    missing = [n for n in names if not results.get(n)]
    return fail(f"after {timeout:.0f}s: unhealthy rules {bad[:3]}; series missing {missing}")


# ---- drain -----------------------------------------------------------------------------------------------------
def metric_value(base: str, name: str) -> float | None:
    status, body = http("GET", base + "/metrics", timeout=5)
    if status != 200:
        return None
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", body.decode(errors="replace"), re.M)
    return float(m.group(1)) if m else None


def context_window(base: str, default: int) -> int:
    """The served model's context window if the API tells it (/info or /v1/models), else `default`."""
    for path in ("/info", "/v1/models"):
        found = re.search(r'"(?:context_window|block_size)"\s*:\s*(\d+)', json.dumps(get_json(base + path) or {}))
        if found:
            return int(found.group(1))
    return default


def calibrate(base: str, wanted: int) -> tuple[int, float]:
    """Largest max_new_tokens <= wanted the API accepts, and how long one such request takes alone."""
    n = wanted
    while n >= 8:
        status, out, elapsed = generate(base, n)
        if status == 200:
            return n, elapsed
        if status not in (400, 413, 422):
            raise RuntimeError(f"/generate -> {status}: {json.dumps(out)[:300]}")
        n //= 2
    raise RuntimeError("/generate refused every max_new_tokens down to 8")


def cmd_drain(base: str, stop: list[str], tokens: int | None, concurrency: int) -> int:
    """Keep `concurrency` long requests going, run `stop` (it sends SIGTERM) and watch the drain.

    Passes when /ready turned 503, at least one request that was running then finished with 200 afterwards,
    and no admitted request failed. Requests sent once the drain began may get 503 or find nobody listening.
    """
    window = context_window(base, 256)
    n, alone = calibrate(base, tokens or max(8, window - len(PROMPT.encode()) - 1))
    print(f"  {concurrency} clients sending requests of max_new_tokens={n} back to back (one alone: {alone:.2f}s)")
    draining = threading.Event()
    results: list[tuple[float, int, dict]] = []  # (finished at, status, body)
    lock = threading.Lock()

    def client(i: int) -> None:
        seed = 100 * i
        while not draining.is_set():
            status, out, _ = generate(base, n, seed=seed, timeout=180)
            with lock:
                results.append((time.monotonic(), status, out))
            if status != 200:
                return
            seed += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while (metric_value(base, "shortcut_requests_running") or 0) < 1:  # until the server reports work
        if time.monotonic() > deadline:
            return fail("the server never reported a running request")
        time.sleep(0.01)
    proc = subprocess.Popen(stop, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(f"  `{' '.join(stop)}` with requests running")
    t_503, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:  # the signal reaches the app some time after the command starts
        status, _ = http("GET", base + "/ready", timeout=3)
        if status == 503:
            t_503 = time.monotonic()
            break
        if status != 200:
            break
        time.sleep(0.01)
    draining.set()
    for t in threads:
        t.join(timeout=180)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return fail("the stop command did not return within 120s")
    if proc.returncode != 0:
        return fail(f"the stop command failed (rc={proc.returncode}): {out.strip()}")
    if any(t.is_alive() for t in threads):
        return fail("requests still unanswered 180s after the stop")

    completed = [r for r in results if r[1] == 200]
    bad = [r for r in results if r[1] not in (200, 503, REFUSED) or (r[1] == 200 and check_generation(200, r[2]))]
    drained = [r for r in completed if t_503 is not None and r[0] > t_503]
    statuses = sorted({"refused" if r[1] == REFUSED else r[1] for r in results})
    print(
        f"  /ready -> {'503 once the drain began' if t_503 else 'never 503'}; {len(results)} answers {statuses}; "
        f"{len(drained)} requests finished with 200 after /ready turned 503"
    )
    if bad:
        return fail("requests lost or failed: " + "; ".join(f"{r[1]} {json.dumps(r[2])[:150]}" for r in bad[:3]))
    if t_503 is None:
        return fail("/ready never answered 503 between SIGTERM and exit")
    if not drained:
        return fail("no request was still running when the drain began (raise --concurrency or --tokens)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("base")
    w.add_argument("path")
    w.add_argument("--timeout", type=float, default=180)
    sub.add_parser("generate").add_argument("base")
    sub.add_parser("diagnostics").add_argument("base")
    for name in ("prometheus", "rules"):
        sp = sub.add_parser(name)
        sp.add_argument("prom")
        sp.add_argument("--timeout", type=float, default=60)
    d = sub.add_parser("drain")
    d.add_argument("base")
    d.add_argument("--tokens", type=int, default=None)
    d.add_argument("--concurrency", type=int, default=8)
    d.add_argument("kill", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    try:
        if a.cmd == "wait":
            return cmd_wait(a.base, a.path, a.timeout)
        if a.cmd == "generate":
            return cmd_generate(a.base)
        if a.cmd == "diagnostics":
            return cmd_diagnostics(a.base)
        if a.cmd == "prometheus":
            return cmd_prometheus(a.prom, a.timeout)
        if a.cmd == "rules":
            return cmd_rules(a.prom, a.timeout)
        kill = a.kill[1:] if a.kill[:1] == ["--"] else a.kill
        return cmd_drain(a.base, kill, a.tokens, a.concurrency)
    except RuntimeError as e:
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
