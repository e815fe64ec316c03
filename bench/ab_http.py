"""The server over HTTP in two source trees, interleaved: did a change cost streaming clients anything?

    git worktree add /tmp/base <rev>   # the tree to compare against; build its fused step (make dev) there
    python -m bench.ab_http --base /tmp/base [--clients 1] [--rounds 6]

Starts `python -m app` from each tree (its own code, the shipped checkpoint, one torch thread, one decode thread
unless `--decode-threads`), then in each round, alternating the trees, `--clients` streaming clients each send
`--requests` greedy requests in turn (a 64-byte prompt + 128 new tokens). Per tree: the median and range of the
tokens/s (wall) and of the server's CPU ms per token (its process's CPU time over the round). Only `/generate` with
`stream: true` and `/ready` are used, so any revision serves it. The client runs here, on the same CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.servers import free_port

HERE = Path(__file__).resolve().parent.parent
TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 4


@contextmanager
def serve(tree: Path, decode_threads: int, checkpoint: Path | None) -> Iterator[tuple[int, int]]:
    """`python -m app` from `tree` on a free port until it is ready: (pid, port)."""
    port = free_port()
    env = dict(
        os.environ,
        SHORTCUT_CHECKPOINT=str(checkpoint or tree / "model" / "checkpoints" / "shakespeare.safetensors"),
        SHORTCUT_HOST="127.0.0.1",
        SHORTCUT_PORT=str(port),
        SHORTCUT_THREADS="1",
        SHORTCUT_DECODE_THREADS=str(decode_threads),
        SHORTCUT_LOG_LEVEL="WARNING",
        SHORTCUT_EXTRA_CHECKPOINTS_DIR="",
        SHORTCUT_REQUEST_TIMEOUT_S="600",
    )
    args = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(args, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server from {tree} exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server from {tree} was not ready in 120 s")
            time.sleep(0.1)
        yield proc.pid, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _load(port: int, clients: int, requests: int, new_tokens: int, prompt_bytes: int = 64) -> int:
    """`clients` streaming clients, `requests` each in turn; the token events received."""

    async def client(c: httpx.AsyncClient, i: int) -> int:
        got = 0
        for j in range(requests):
            start = (i * 7 + j) % 64
            body = {
                "prompt": TEXT[start : start + prompt_bytes],
                "max_new_tokens": new_tokens,
                "temperature": 0.0,
                "stream": True,
            }
            async with c.stream("POST", f"http://127.0.0.1:{port}/generate", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"/generate answered {r.status_code}: {(await r.aread())[:500]!r}")
                async for line in r.aiter_lines():
                    got += line.startswith("event: token")
        return got

    async with httpx.AsyncClient(timeout=600, trust_env=False) as c:
        return sum(await asyncio.gather(*(client(c, i) for i in range(clients))))


def compare(
    trees: dict[str, Path],
    clients: int = 1,
    requests: int = 4,
    rounds: int = 6,
    new_tokens: int = 128,
    decode_threads: int = 1,
    checkpoint: Path | None = None,
    prompt_bytes: int = 64,
) -> dict[str, Any]:
    """Each tree's server, rounds alternating the trees: per tree the tokens/s and server CPU ms per token."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    with ExitStack() as stack:
        servers = {name: stack.enter_context(serve(t, decode_threads, checkpoint)) for name, t in trees.items()}
        for _, port in servers.values():
            asyncio.run(_load(port, clients, 1, min(8, new_tokens), prompt_bytes))  # warm
        for _ in range(rounds):
            for name, (pid, port) in servers.items():
                proc = psutil.Process(pid)
                c0, w0 = proc.cpu_times(), time.perf_counter()
                n = asyncio.run(_load(port, clients, requests, new_tokens, prompt_bytes))
                wall, c1 = time.perf_counter() - w0, proc.cpu_times()
                cpu = (c1.user + c1.system) - (c0.user + c0.system)
                runs[name].append((n / wall, 1e3 * cpu / max(n, 1)))
    out: dict[str, Any] = {"clients": clients, "requests": requests, "rounds": rounds, "new_tokens": new_tokens}
    out["prompt_bytes"] = prompt_bytes
    for name, r in runs.items():
        tok_s, cpu_ms = [x[0] for x in r], [x[1] for x in r]
        out[name] = {
            "tok_s": statistics.median(tok_s),
            "tok_s_range": [min(tok_s), max(tok_s)],
            "server_cpu_ms_per_token": statistics.median(cpu_ms),
            "server_cpu_ms_range": [min(cpu_ms), max(cpu_ms)],
        }
    if {"head", "base"} <= set(runs):
        out["tok_s_head_over_base"] = out["head"]["tok_s"] / out["base"]["tok_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the tree to compare this one against")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--requests", type=int, default=4, help="requests each client sends in turn, per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--decode-threads", type=int, default=1, help="SHORTCUT_DECODE_THREADS of both servers")
    a = p.parse_args(argv)
    res = compare(
        {"base": a.base.resolve(), "head": HERE}, a.clients, a.requests, a.rounds, a.new_tokens, a.decode_threads
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
