"""The cost of reading the stream out, in-process: a hidden-state export (array bytes per second, and the base64
encoding on top) and an activation-patching grid (forwards per second, batched against one patch per forward)."""

from __future__ import annotations

import base64
import time
from typing import Any

import torch

from model.readout import hidden_states, patching
from model.transformer import RESID_NAMES, Transformer, run_to_end


def export(model: Transformer, ids: list[int], reps: int = 3) -> dict[str, Any]:
    """Every site of every layer at every position of one prompt: seconds, array bytes, bytes/s (best of `reps`)."""
    layers, sites = list(range(model.config.n_layer)), list(RESID_NAMES)
    best, best_b64 = float("inf"), float("inf")
    n_bytes = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        [arr] = run_to_end(hidden_states(model, [ids], layers, sites, [list(range(len(ids)))]))
        t1 = time.perf_counter()
        base64.b64encode(arr.numpy().astype("<f4").tobytes())
        t2 = time.perf_counter()
        best, best_b64 = min(best, t1 - t0), min(best_b64, t2 - t1)
        n_bytes = arr.numel() * 4
    return {
        "tokens": len(ids),
        "array_bytes": n_bytes,
        "forward_s": best,
        "bytes_per_s": n_bytes / best,
        "base64_s": best_b64,
    }


def patching_grid(model: Transformer, clean: list[int], corrupt: list[int], sites: tuple[str, ...]) -> dict[str, Any]:
    """The same grid batched (the default rows per forward) and naive (one patched row per forward)."""
    out: dict[str, Any] = {
        "tokens": len(clean),
        "sites": list(sites),
        "cells": len(sites) * model.config.n_layer * len(clean),
    }
    for name, per_forward in (("batched", None), ("naive", len(clean))):
        kw = {} if per_forward is None else {"tokens_per_forward": per_forward}
        t0 = time.perf_counter()
        res = run_to_end(patching(model, clean, corrupt, target=None, sites=sites, **kw))
        wall = time.perf_counter() - t0
        out[name] = {
            "forwards": res.forwards,
            "wall_s": wall,
            "cells_per_s": out["cells"] / wall,
            "forwards_per_s": res.forwards / wall,
        }
        out[f"{name}_raw"] = res.raw
    same = all(
        torch.allclose(torch.tensor(out["batched_raw"][s]), torch.tensor(out["naive_raw"][s]), atol=1e-4) for s in sites
    )
    del out["batched_raw"], out["naive_raw"]
    out["batched_equals_naive"] = same
    out["speedup"] = out["naive"]["wall_s"] / out["batched"]["wall_s"]
    return out
