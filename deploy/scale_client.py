"""Load and failover checks for deploy/scale-smoke.sh (standard library only: it runs on the host, outside the venv).

Every request is a streaming POST /generate through the balancer; HAProxy names the replica that served it in the
X-Shortcut-Replica header. Each subcommand prints what it saw and exits 0 when the check holds, 1 otherwise:
  balanced LB --replica NAME=URL... [--clients 60 --seconds 20 --tokens 48 --out FILE]
           clients stream back to back for SECONDS; 0 errors, and every replica's own /metrics counted a share
  sse      LB [--tokens 200]
           one stream: tokens arrive one by one, the first long before the last
  stop     LB --victim NAME=URL [--clients 24] -- COMMAND...
           COMMAND (SIGTERM to the victim) while it runs requests: 0 failures among requests started after it,
           and the victim's in-flight requests finish with 200
  kill     LB --victim NAME=URL --stats STATS_URL [--clients 24] -- COMMAND...
           COMMAND (SIGKILL to the victim) while it runs requests: only requests in flight on the victim fail;
           new requests succeed; reports when HAProxy marked it down
  prometheus PROM_URL --replicas N
           Prometheus scrapes N api replicas (each up, each with generated tokens) and the balancer
  servers  STATS_URL NAME=STATE...  [--timeout 60]
           wait until HAProxy reports each named server in the state (UP, DOWN, MAINT...)
  steering LB --replica NAME=URL... [--layer 1]
           a named steering vector made through the balancer is read, and used by name in /generate's
           intervention.add, on every replica; deleted through the balancer, it is gone from every replica
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke_client import FINISHED, PROMPT, fail, metric_value, prom_query  # noqa: E402
from smoke_client import http as request  # noqa: E402


@dataclass
class Result:
    """One streaming request as the client saw it."""

    start: float
    end: float = 0.0
    status: int = 0  # HTTP status; 0 when no response head arrived
    replica: str = ""
    tokens: int = 0  # token events received
    token_times: list[float] = field(default_factory=list)
    finish: str | None = None  # finish_reason of the `done` event
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.finish in FINISHED and not self.error


def stream(base: str, tokens: int, seed: int, timeout: float = 180) -> Result:
    """POST /generate with stream=true; read the events as they come."""
    url = urllib.parse.urlsplit(base)
    body = json.dumps(
        {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0.8, "seed": seed, "stream": True}
    ).encode()
    r = Result(start=time.monotonic())
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    try:
        conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        r.status, r.replica = resp.status, resp.getheader("X-Shortcut-Replica", "")
        if resp.status != 200:
            r.error = resp.read()[:200].decode(errors="replace")
            return r
        event = ""
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "token":
                r.tokens += 1
                r.token_times.append(time.monotonic())
            elif line.startswith("data:") and event == "done":
                r.finish = json.loads(line[5:]).get("finish_reason")
            elif line.startswith("data:") and event == "error":
                r.error = line[5:].strip()[:200]
        if r.finish is None and not r.error:
            r.error = "stream ended without a done event"
    except (OSError, http.client.HTTPException, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        r.end = time.monotonic()
        conn.close()
    return r


class Load:
    """`clients` threads streaming back to back through the balancer until stop()."""

    def __init__(self, base: str, clients: int, tokens: int) -> None:
        self.base, self.tokens = base, tokens
        self.results: list[Result] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        seed = 1000 * i
        while not self._stop.is_set():
            try:
                r = stream(self.base, self.tokens, seed)
            except Exception as e:  # noqa: BLE001 - a client bug must show up as a failed request, not a dead thread
                r = Result(start=time.monotonic(), end=time.monotonic(), error=f"client: {type(e).__name__}: {e}")
            with self._lock:
                self.results.append(r)
            seed += 1

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 240) -> bool:
        """Stop sending; wait for the requests in flight. False if some never ended."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)


def replica_counters(url: str) -> tuple[float, float]:
    """(finished requests, generated tokens) from one replica's own /metrics."""
    status, body = request("GET", url + "/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"{url}/metrics -> {status}")
    done = tokens = 0.0
    for line in body.decode().splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name == "shortcut_request_success_total":
            done += float(line.rsplit(" ", 1)[1])
        elif name == "shortcut_generation_tokens_total":
            tokens += float(line.rsplit(" ", 1)[1])
    return done, tokens


def parse_replicas(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def describe_failures(results: list[Result], limit: int = 3) -> str:
    bad = [r for r in results if not r.ok]
    return "; ".join(f"{r.replica or '?'} status {r.status} {r.error[:120]!r}" for r in bad[:limit])


# ---- balanced -------------------------------------------------------------------------------------------------
def cmd_balanced(
    base: str, replicas: dict[str, str], clients: int, seconds: float, tokens: int, out: str | None
) -> int:
    before = {name: replica_counters(url) for name, url in replicas.items()}
    load = Load(base, clients, tokens).start()
    t0 = time.monotonic()
    time.sleep(seconds)
    if not load.stop():
        return fail("requests still open 240 s after the load stopped")
    wall = time.monotonic() - t0
    after = {name: replica_counters(url) for name, url in replicas.items()}
    results = load.results
    ok = [r for r in results if r.ok]
    total_tokens = sum(r.tokens for r in ok)
    served = {name: after[name][0] - before[name][0] for name in replicas}
    generated = {name: after[name][1] - before[name][1] for name in replicas}
    by_header = {name: sum(1 for r in ok if r.replica == name) for name in replicas}
    tok_s = total_tokens / wall
    ttft = sorted(r.token_times[0] - r.start for r in ok if r.token_times)
    p50 = ttft[len(ttft) // 2] if ttft else float("nan")
    print(
        f"  {clients} streaming clients for {wall:.1f}s, max_new_tokens={tokens}: {len(results)} requests, "
        f"{len(results) - len(ok)} failed; {total_tokens} tokens = {tok_s:.0f} tokens/s aggregate, "
        f"TTFT p50 {p50 * 1000:.0f} ms"
    )
    for name in replicas:
        share = 100 * generated[name] / max(1.0, sum(generated.values()))
        print(
            f"  {name}: /metrics counted {served[name]:.0f} finished requests, {generated[name]:.0f} tokens "
            f"({share:.0f}%); the balancer's header named it on {by_header[name]}"
        )
    if out:
        Path(out).write_text(
            json.dumps(
                {
                    "replicas": list(replicas),
                    "clients": clients,
                    "max_new_tokens": tokens,
                    "wall_s": wall,
                    "requests": len(results),
                    "failed": len(results) - len(ok),
                    "tokens": total_tokens,
                    "tokens_per_s": tok_s,
                    "ttft_p50_s": p50,
                    "per_replica_finished": served,
                    "per_replica_tokens": generated,
                },
                indent=2,
            )
            + "\n"
        )
    if len(ok) != len(results):
        return fail(f"{len(results) - len(ok)} requests failed: {describe_failures(results)}")
    if not results:
        return fail("no request finished")
    idle = [name for name, n in served.items() if n < 1]
    if idle:
        return fail(f"replicas that served nothing (by their own /metrics): {idle}")
    return 0


# ---- sse ------------------------------------------------------------------------------------------------------
def cmd_sse(base: str, tokens: int, streams: int = 3, background: int = 6) -> int:
    """`streams` streams one after the other (leastconn sends them to different replicas), next to `background`
    other clients so that each replica decodes a small batch, as in service, not one row flat out (~1 ms a token
    here, where the server's own event loop may get to write only every few tokens).

    Token by token means: the first token arrives long before the last, and the tokens arrive at many distinct
    moments (at least a quarter as many ms-distinct arrival times as tokens; a proxy that buffers or coalesces
    delivers them in a few bursts). The share of tokens in the first half of the stream is only reported: the
    decode rate changes as the background requests come and go.
    """
    problems, results = [], []
    load = Load(base, background, 48).start()
    try:
        time.sleep(1)
        results = [stream(base, tokens, seed=7 + i) for i in range(streams)]
    finally:
        load.stop()
    for r in results:
        if not r.ok or r.tokens < tokens // 2:
            return fail(f"stream failed: status {r.status}, {r.tokens} tokens, {r.error!r}")
        first, last = r.token_times[0] - r.start, r.token_times[-1] - r.start
        early = sum(t - r.start <= last / 2 for t in r.token_times) / r.tokens
        arrivals = len({round(t - r.start, 3) for t in r.token_times})
        print(
            f"  {r.tokens} token events via {r.replica}: first after {first * 1000:.0f} ms, last after "
            f"{last * 1000:.0f} ms, {100 * early:.0f}% of them in the first half, {arrivals} distinct arrival "
            f"times (ms)"
        )
        if not first < 0.5 * last:
            problems.append(f"{r.replica}: the first token did not arrive well before the last")
        elif arrivals < r.tokens / 4:
            problems.append(f"{r.replica}: {r.tokens} tokens arrived at only {arrivals} distinct times")
    if problems:
        return fail("buffered? " + "; ".join(problems))
    return 0


# ---- stop / kill ----------------------------------------------------------------------------------------------
def wait_running(url: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric_value(url, "shortcut_requests_running") or 0) >= 2:
            return True
        time.sleep(0.05)
    return False


def run_during_load(
    base: str, victim_url: str, clients: int, tokens: int, command: list[str], after_s: float
) -> tuple[list[Result], float, subprocess.CompletedProcess | None]:
    """Start the load, wait until the victim runs requests, run `command`, keep the load `after_s` longer."""
    load = Load(base, clients, tokens).start()
    if not wait_running(victim_url):
        load.stop()
        raise RuntimeError("the victim never ran 2 requests at once")
    t_cmd = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    time.sleep(after_s)
    if not load.stop():
        raise RuntimeError("requests still open 240 s after the load stopped")
    return load.results, t_cmd, done


def cmd_stop(base: str, victim: tuple[str, str], clients: int, tokens: int, command: list[str]) -> int:
    name, url = victim
    results, t_stop, done = run_during_load(base, url, clients, tokens, command, after_s=3)
    if done.returncode != 0:
        return fail(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    after = [r for r in results if r.start >= t_stop]
    in_flight = [r for r in results if r.replica == name and r.start < t_stop < r.end]
    failed = [r for r in results if not r.ok]
    # (a request sent just after the command but before the signal reached the app is still accepted
    # there, and drained like the others)
    late = sum(r.replica == name for r in after)
    print(
        f"  `{' '.join(command)}` with {len(in_flight)} requests in flight on {name}; {len(results)} requests, "
        f"{len(after)} started after the stop ({sum(r.ok for r in after)} ok; {late} still landed on {name} "
        f"before the signal); {sum(r.ok for r in in_flight)}/{len(in_flight)} in flight on {name} finished "
        f"with 200; requests after the stop were served by {sorted({r.replica for r in after})}"
    )
    if failed:
        return fail(f"{len(failed)} requests failed: {describe_failures(failed)}")
    if not in_flight:
        return fail(f"no request was in flight on {name} at the stop")
    return 0


def server_status(stats: str, server: str) -> str:
    status, body = request("GET", stats + "/stats;csv", timeout=5)
    if status != 200:
        return "?"
    rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
    return next((row["status"] for row in rows if row["pxname"] == "shortcut" and row["svname"] == server), "?")


def cmd_kill(base: str, victim: tuple[str, str], stats: str, clients: int, tokens: int, command: list[str]) -> int:
    name, url = victim
    marks: list[tuple[float, str]] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            marks.append((time.monotonic(), server_status(stats, name)))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results, t_kill, done = run_during_load(base, url, clients, tokens, command, after_s=6)
    finally:
        watching.set()
        watcher.join(timeout=5)
    if done.returncode != 0:
        return fail(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    down = next((t - t_kill for t, s in marks if t > t_kill and s.startswith(("DOWN", "MAINT"))), None)
    in_flight = [r for r in results if r.replica == name and r.start < t_kill < r.end]
    failed = [r for r in results if not r.ok]
    stray = [r for r in failed if r not in in_flight]
    after = [r for r in results if r.start >= t_kill]
    marked = f"{down:.1f} s" if down is not None else "never (within the step)"
    print(
        f"  `{' '.join(command)}` with {len(in_flight)} requests in flight on {name}: "
        f"{sum(not r.ok for r in in_flight)} of them failed; {len(after)} requests started after the kill, "
        f"{sum(r.ok for r in after)} ok, served by {sorted({r.replica for r in after if r.ok})}; "
        f"HAProxy marked {name} down after {marked}"
    )
    if stray:
        return fail(f"{len(stray)} failures outside {name}'s in-flight requests: {describe_failures(stray)}")
    if not in_flight:
        return fail(f"no request was in flight on {name} at the kill")
    if not any(r.ok for r in after):
        return fail("no request started after the kill succeeded")
    return 0


# ---- prometheus / servers ------------------------------------------------------------------------------------
def cmd_prometheus(prom: str, replicas: int, timeout: float) -> int:
    """Every replica is its own target, up, with its own token counter; the balancer is scraped too."""
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        up = prom_query(prom, 'up{job="shortcut-api"} == 1') or []
        tokens = prom_query(prom, 'sum by (instance) (shortcut_generation_tokens_total{job="shortcut-api"}) > 0') or []
        lb = prom_query(prom, 'up{job="haproxy"} == 1') or []
        seen = {
            "up": sorted(r["metric"]["instance"] for r in up),
            "with tokens": sorted(r["metric"]["instance"] for r in tokens),
            "haproxy up": len(lb),
        }
        if len(seen["up"]) == len(seen["with tokens"]) == replicas and lb:
            print(f"  targets up: {seen['up']}; each has generated tokens; the balancer is scraped too")
            return 0
        time.sleep(2)
    return fail(f"after {timeout:.0f}s: {seen}")


def cmd_steering(base: str, replicas: dict[str, str], layer: int) -> int:
    """Make a vector through the balancer; every replica serves it (GET, and POST /generate with it by name); delete
    it through the balancer; every replica answers 404 for it and refuses it in /generate (400 naming the field)."""
    name = f"smoke-steer-{int(time.time() * 1000) % 10**9}"
    body = {
        "name": name,
        "layer": layer,
        "positive": ["ROMEO: HARK!", "THE KING"],
        "negative": ["romeo: hark!", "the king"],
    }
    status, raw = request("POST", f"{base}/steering/vectors", body, timeout=120)
    if status != 201:
        return fail(f"POST /steering/vectors through the balancer: {status} {raw[:300]!r}")
    made = json.loads(raw)
    gen = {"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0}
    steered = {**gen, "intervention": {"add": [{"layer": layer, "name": name, "coeff": 1.0}]}}
    problems, used = [], []
    for replica, url in replicas.items():
        status, raw = request("GET", f"{url}/steering/vectors/{name}")
        if status != 200 or json.loads(raw).get("norm") != made["norm"]:
            problems.append(f"{replica}: GET after the create: {status} {raw[:200]!r}")
        status, raw = request("POST", f"{url}/generate", steered, timeout=120)
        if status == 200:
            used.append(replica)
        elif not (status == 422 and b"intervention.add" in raw):  # 422: a build without the per-request half
            problems.append(f"{replica}: /generate with it by name: {status} {raw[:200]!r}")
    status, raw = request("DELETE", f"{base}/steering/vectors/{name}")
    if status != 204:
        problems.append(f"DELETE through the balancer: {status} {raw[:200]!r}")
    for replica, url in replicas.items():
        status, raw = request("GET", f"{url}/steering/vectors/{name}")
        if status != 404:
            problems.append(f"{replica}: GET after the delete: {status} (wanted 404)")
        if replica in used:
            status, raw = request("POST", f"{url}/generate", steered, timeout=120)
            if status != 400 or b"intervention.add[0].name" not in raw:
                problems.append(f"{replica}: /generate after the delete: {status} {raw[:200]!r} (wanted 400)")
        status, raw = request("GET", f"{url}/steering/vectors")
        if status != 200 or name in [v["name"] for v in json.loads(raw)["data"]]:
            problems.append(f"{replica}: still listed after the delete ({status})")
    if problems:
        return fail("; ".join(problems))
    how = f"used by name in /generate on {', '.join(used)}" if used else "read (this build has no intervention.add)"
    print(f"  {name} (norm {made['norm']:.3g}) made through the balancer, {how} and on every replica; deleted: gone")
    return 0


def cmd_servers(stats: str, wanted: dict[str, str], timeout: float) -> int:
    deadline, now = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        now = {name: server_status(stats, name) for name in wanted}
        if all(now[n].startswith(state) for n, state in wanted.items()):
            print("  HAProxy: " + ", ".join(f"{n} {s}" for n, s in now.items()))
            return 0
        time.sleep(0.5)
    return fail(f"HAProxy after {timeout:.0f}s: {now} (wanted {wanted})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("balanced")
    b.add_argument("base")
    b.add_argument("--replica", action="append", default=[], required=True)
    b.add_argument("--clients", type=int, default=60)
    b.add_argument("--seconds", type=float, default=20)
    b.add_argument("--tokens", type=int, default=48)
    b.add_argument("--out")
    s = sub.add_parser("sse")
    s.add_argument("base")
    s.add_argument("--tokens", type=int, default=200)
    for name in ("stop", "kill"):
        k = sub.add_parser(name)
        k.add_argument("base")
        k.add_argument("--victim", required=True)
        k.add_argument("--stats")
        k.add_argument("--clients", type=int, default=24)
        k.add_argument("--tokens", type=int, default=96)
    pr = sub.add_parser("prometheus")
    pr.add_argument("prom")
    pr.add_argument("--replicas", type=int, required=True)
    pr.add_argument("--timeout", type=float, default=90)
    st = sub.add_parser("steering")
    st.add_argument("base")
    st.add_argument("--replica", action="append", default=[], required=True)
    st.add_argument("--layer", type=int, default=1)
    sv = sub.add_parser("servers")
    sv.add_argument("stats")
    sv.add_argument("wanted", nargs="+")
    sv.add_argument("--timeout", type=float, default=60)
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1 :] if "--" in argv else []  # stop/kill: the command to run mid-load
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        if a.cmd == "prometheus":
            return cmd_prometheus(a.prom, a.replicas, a.timeout)
        if a.cmd == "servers":
            return cmd_servers(a.stats, parse_replicas(a.wanted), a.timeout)
        if a.cmd == "balanced":
            return cmd_balanced(a.base, parse_replicas(a.replica), a.clients, a.seconds, a.tokens, a.out)
        if a.cmd == "sse":
            return cmd_sse(a.base, a.tokens)
        if a.cmd == "steering":
            return cmd_steering(a.base, parse_replicas(a.replica), a.layer)
        if not command:
            return fail("no command after --")
        victim = tuple(a.victim.split("=", 1))
        if a.cmd == "stop":
            return cmd_stop(a.base, victim, a.clients, a.tokens, command)
        return cmd_kill(a.base, victim, a.stats, a.clients, a.tokens, command)
    except RuntimeError as e:
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
