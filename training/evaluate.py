"""Evaluation CLI: python -m training.evaluate --checkpoint PATH --data PATH [--split val|train|all].

Mean next-byte cross-entropy over a split, with every byte after the split's first scored exactly once.
Sliding windows of `block_size` bytes move by `stride = block_size // 2`: the first window scores all its
targets, every later window only its last `stride`, so each target sees at least `block_size - stride`
bytes of context where the text allows. When the remaining targets do not fill a whole window, one
final window is aligned to the end of the split and scores only the targets not scored yet.
The split is taken as one sequence: `--split all` scores the whole file, not train and val separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint
from model.fast import FusedDecoder
from model.kv_cache import KVCache
from model.transformer import Transformer
from training.train import load_splits

log = logging.getLogger("training.evaluate")


@dataclass(frozen=True)
class Window:
    """One scoring window: inputs data[start:start+length], targets shifted by one; targets j >= skip count."""

    start: int
    length: int
    skip: int


def plan_windows(n_bytes: int, block_size: int) -> list[Window]:
    """Windows that score targets 1..n_bytes-1 exactly once (see the module docstring)."""
    n_targets = n_bytes - 1
    if n_targets < 1:
        return []
    if n_targets <= block_size:
        return [Window(0, n_targets, 0)]
    stride = max(1, block_size // 2)
    windows = [Window(0, block_size, 0)]
    start = stride
    while start + block_size <= n_targets:  # full window: its targets are start+1 .. start+block_size
        windows.append(Window(start, block_size, block_size - stride))
        start += stride
    scored_to = windows[-1].start + block_size  # last target position scored so far
    if scored_to < n_targets:
        tail = n_targets - block_size  # aligned to the end: targets tail+1 .. n_targets
        windows.append(Window(tail, block_size, scored_to - tail))
    return windows


@torch.no_grad()
def evaluate(
    model: Transformer, data: torch.Tensor, batch_size: int = 32, kv_dtype: torch.dtype | None = None
) -> dict[str, float | int]:
    """Sliding-window next-byte cross-entropy of `model` over the 1-D byte tensor `data`.

    `kv_dtype`: run each window through a KV cache of that dtype, as the server's prefill and decode steps do (a
    float16 cache rounds every key and value once, when written); None: no cache."""
    if data.dim() != 1 or len(data) < 2:
        raise ValueError(f"need a 1-D tensor of at least 2 bytes, got shape {tuple(data.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    block_size = model.config.block_size
    windows = plan_windows(len(data), block_size)
    device = next(model.parameters()).device
    tokens = data.to(torch.long)  # (N,)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b0 in range(0, len(windows), batch_size):
            batch = windows[b0 : b0 + batch_size]
            length = batch[0].length  # every window has the same length
            starts = torch.tensor([w.start for w in batch])  # (b,)
            offsets = starts[:, None] + torch.arange(length + 1)  # (b, L+1)
            chunk = tokens[offsets].to(device)  # (b, L+1)
            x, y = chunk[:, :-1], chunk[:, 1:]  # (b, L) each
            if kv_dtype is None:
                logits = model(x).logits  # (b, L, V)
            else:
                cache = KVCache(model.config, len(batch), device=device, dtype=kv_dtype)
                logits = model(x, cache=cache, pos=torch.zeros(len(batch), dtype=torch.long, device=device)).logits
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)  # (b, L)
            skips = torch.tensor([w.skip for w in batch], device=device)  # (b,)
            keep = torch.arange(length, device=device)[None, :] >= skips[:, None]  # (b, L)
            total += nll[keep].double().sum().item()
            count += int(keep.sum())
            if (b0 // batch_size) % 50 == 0:
                log.info("evaluated %d/%d windows", min(b0 + batch_size, len(windows)), len(windows))
    finally:
        model.train(was_training)
    return _scores(total, count, len(windows), block_size)


def _scores(total: float, count: int, n_windows: int, block_size: int) -> dict[str, float | int]:
    """An evaluation's answer from its summed negative log-likelihood (nats) over `count` scored bytes."""
    nats = total / count
    return {
        "nats_per_byte": nats,
        "bits_per_byte": nats / math.log(2),
        "bytes_scored": count,
        "sum_nats": total,
        "windows": n_windows,
        "block_size": block_size,
        "stride": max(1, block_size // 2),
    }


@torch.no_grad()
def evaluate_fused(
    decoder: FusedDecoder, data: torch.Tensor, kv_dtype: torch.dtype = torch.float32
) -> dict[str, float | int]:
    """`evaluate` through the served fused C step (`FusedDecoder.prefill`, every position's logits), one window at a
    time: the same windows and targets, the numbers of the step the server runs (e.g. its int8 weights)."""
    if data.dim() != 1 or len(data) < 2:
        raise ValueError(f"need a 1-D tensor of at least 2 bytes, got shape {tuple(data.shape)}")
    cfg = decoder.config
    windows = plan_windows(len(data), cfg.block_size)
    tokens = data.to(torch.long)
    total, count = 0.0, 0
    for i, w in enumerate(windows):
        chunk = tokens[w.start : w.start + w.length + 1]
        cache = KVCache(cfg, 1, dtype=kv_dtype)
        logits = decoder.prefill(chunk[:-1], cache, all_logits=True).logits  # (L, V)
        nll = F.cross_entropy(logits[w.skip :], chunk[1 + w.skip :], reduction="sum")
        total += float(nll.double())
        count += w.length - w.skip
        if i % 200 == 0:
            log.info("evaluated %d/%d windows (fused step)", i + 1, len(windows))
    return _scores(total, count, len(windows), cfg.block_size)


def select_split(path: str | Path, split: str) -> tuple[torch.Tensor, str]:
    """Bytes of the requested split ('train', 'val' or 'all') as a uint8 tensor, and the file's sha256."""
    train_split, val_split, sha = load_splits(path)
    if split == "train":
        return train_split, sha
    if split == "val":
        return val_split, sha
    if split == "all":
        return torch.cat([train_split, val_split]), sha
    raise ValueError(f"unknown split {split!r} (expected train, val or all)")


@torch.no_grad()
def round_linear_weights_to_float16(model: Transformer) -> None:
    """Round every `nn.Linear` weight to the nearest float16 value in place (kept as float32)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.copy_(module.weight.half().float())


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, evaluate, and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--data", required=True, help="text file (UTF-8 bytes); split as in training.train")
    p.add_argument("--split", choices=("val", "train", "all"), default="val")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--weights",
        choices=("float32", "float16", "int8"),
        default="float32",
        help="float16: round every Linear weight to float16 first, as SHORTCUT_DECODE_WEIGHTS=float16 "
        "stores them (the arithmetic stays float32); int8: through the fused C step with int8 weights "
        "(SHORTCUT_DECODE_WEIGHTS=int8; implies --fused)",
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="score through the served fused C step (its prefill; one window at a time) instead of the reference "
        "forward (needs `python -m model.fast.build`)",
    )
    p.add_argument("--decode-threads", type=int, default=1, help="the fused step's threads (same numbers)")
    p.add_argument(
        "--kv-cache",
        choices=("none", "float32", "float16"),
        default="none",
        help="float16: keys and values rounded to float16 when cached, as SHORTCUT_KV_CACHE_DTYPE=float16 (the "
        "server's default with the fused float16 step) keeps them; none: the plain forward",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.monotonic()
    ck = load_checkpoint(a.checkpoint)
    data, data_sha = select_split(a.data, a.split)
    if len(data) < 2:
        p.error(f"the {a.split} split of {a.data} has {len(data)} bytes; at least 2 are needed")
    kv = None if a.kv_cache == "none" else getattr(torch, a.kv_cache)
    fused = a.fused or a.weights == "int8"
    if fused:
        dec = FusedDecoder(ck.model.eval(), weights=a.weights, threads=a.decode_threads)
        result = evaluate_fused(dec, data, kv_dtype=kv or torch.float32)
    else:
        if a.weights == "float16":
            round_linear_weights_to_float16(ck.model)
        result = evaluate(ck.model, data, batch_size=a.batch_size, kv_dtype=kv)
    summary = {
        **result,
        "split": a.split,
        "weights": a.weights,
        "kv_cache": a.kv_cache,
        "path": "fused" if fused else "reference",
        "checkpoint": str(a.checkpoint),
        "checkpoint_sha256": ck.sha256,
        "data": str(a.data),
        "data_sha256": data_sha,
        "split_bytes": len(data),
        "params": ck.model.num_params(),
        "seconds": round(time.monotonic() - t0, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
