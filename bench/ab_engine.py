"""The engine's CPU time per token in two source trees, interleaved: did a change to the engine cost anything?

    git worktree add /tmp/base <rev>   # the tree to compare against; build its fused step (make dev) there
    python -m bench.ab_engine --base /tmp/base [--rounds 5]

Each round runs one fresh process per tree and batch size (1 and 32 greedy requests of a 64-token prompt + 192 new
tokens on the shipped checkpoint, one thread), alternating the trees, and reads the process's CPU time from the first
submit to the last finish over the tokens generated. Only the engine's public API is used, so any revision runs it.
Prints one JSON line: per tree and batch size the median ms per token, and the ratio head / base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# run inside each tree (its own `model` package first on sys.path)
CHILD = r"""
import asyncio, json, sys, time, torch
torch.set_num_threads(1)
from model.checkpoint import load_checkpoint
from model.engine import Engine, SamplingParams
batch, new = int(sys.argv[1]), int(sys.argv[2])
model = load_checkpoint("model/checkpoints/shakespeare.safetensors").model
prompt = list(("ROMEO:\nBut soft, what light through yonder window breaks? It is the east and Ju").encode())[:64]
async def main():
    engine = Engine(model, max_batch_size=32)
    engine.warm_up()
    engine.start()
    try:
        async def one(i):
            _, fin = await engine.submit(prompt, SamplingParams(max_new_tokens=new, temperature=0)).result()
            return fin.completion_tokens
        await asyncio.gather(*(one(i) for i in range(2)))  # warm
        c0 = time.process_time()
        n = sum(await asyncio.gather(*(one(i) for i in range(batch))))
        return (time.process_time() - c0) * 1e3 / n
    finally:
        engine.stop()
print(json.dumps({"ms_per_token": asyncio.run(main())}))
"""


def measure(tree: Path, batch: int, new_tokens: int) -> float:
    """CPU ms per token of one fresh process in `tree`."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(batch), str(new_tokens)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["ms_per_token"])


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="the source tree to compare against")
    p.add_argument("--head", type=Path, default=HERE, help="the source tree under test (default: this one)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=192)
    a = p.parse_args(argv)
    trees = {"base": a.base.resolve(), "head": a.head.resolve()}
    times: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in trees}
    for r in range(a.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]  # alternate who goes first
        for batch in (1, 32):
            for name in order:
                times[name][batch].append(measure(trees[name], batch, a.new_tokens))
    med = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in times.items()}
    result = {
        "ms_per_token_median": {name: {f"bs{b}": round(v, 4) for b, v in per.items()} for name, per in med.items()},
        "head_over_base": {f"bs{b}": round(med["head"][b] / med["base"][b], 3) for b in (1, 32)},
        "runs": {name: {f"bs{b}": [round(x, 4) for x in v] for b, v in per.items()} for name, per in times.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
