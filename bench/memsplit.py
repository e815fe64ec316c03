"""The server's resident memory, split: `python -m bench.memsplit CHECKPOINT ROWS` loads what `python -m app` loads,
in the same order, in a fresh process, and prints the RSS after each stage as JSON (MB):

- `python`: the interpreter alone; `torch_import`: after `import torch`; `app_import`: after `import app.main`
  (FastAPI, pydantic, uvicorn, prometheus and the rest of the app);
- `engine`: after loading the checkpoint and building the Engine (the model, its decode weights, the KV cache
  allocated but not yet resident); `warm`: after its warm-up (TorchScript compiles the steps) and `malloc_trim`,
  as the server does;
- `kv_full`: after every one of the ROWS rows' keys and values is written (a full batch at the end of the window).

`split` turns these into parts: the KV cache is its allocated size (all resident when full), the warm-up part is
what is left of `kv_full - engine` (the compiled steps, scratch). `bench.run` puts the server's measured peak next
to them: the rest is what the server holds beyond them (requests, HTTP, activations, allocator slack).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def rss_mb() -> float:
    """This process's current resident set (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stages(checkpoint: Path, rows: int) -> dict[str, float]:
    """RSS (MB) after each stage (see the module docstring)."""
    out = {"python": rss_mb()}
    import torch

    out["torch_import"] = rss_mb()
    import app.main  # noqa: F401 - what the server imports
    from app.service import configure_threads, release_free_memory
    from model.checkpoint import load_checkpoint
    from model.engine import Engine

    configure_threads(1)
    out["app_import"] = rss_mb()
    ck = load_checkpoint(checkpoint)
    engine = Engine(ck.model, max_batch_size=rows)
    out["engine"] = rss_mb()
    engine.warm_up()
    release_free_memory()
    out["warm"] = rss_mb()
    cache = engine.cache
    with torch.inference_mode():  # every cache page written, as a full batch at the end of the window leaves it
        cache.k.fill_(1.0)
        cache.v.fill_(1.0)
    out["kv_full"] = rss_mb()
    out["kv_cache_bytes_mb"] = (cache.k.numel() + cache.v.numel()) * cache.k.element_size() / 2**20
    return out


def split(st: dict[str, float], server_peak_mb: float | None = None) -> dict[str, Any]:
    """Increments of `stages`, and the rest of a server's peak RSS beyond them (None without a peak)."""
    kv = st["kv_cache_bytes_mb"]
    parts = {
        "python_and_torch_import_mb": st["torch_import"],
        "app_import_mb": st["app_import"] - st["torch_import"],
        "weights_mb": st["engine"] - st["app_import"],
        "kv_cache_mb": kv,
        "warm_up_and_compiled_steps_mb": st["kv_full"] - st["engine"] - kv,
    }
    out: dict[str, Any] = dict(parts)
    out["kv_resident_after_warm_up_mb"] = kv - (st["kv_full"] - st["warm"])  # touched by a 4-row warm-up
    out["sum_mb"] = sum(parts.values())
    out["stages_mb"] = st
    if server_peak_mb:
        out["server_peak_mb"] = server_peak_mb
        out["rest_mb"] = server_peak_mb - out["sum_mb"]
    return out


if __name__ == "__main__":
    print(json.dumps(stages(Path(sys.argv[1]), int(sys.argv[2]))))
