"""Tuned-lens training CLI: python -m training.tuned_lens --checkpoint PATH --data PATH [options].

Trains one affine translator per layer but the last (`model.lens`: h + A h + b before ln_f and the unembedding,
A and b initialised at 0, so training starts from the logit lens) with the model frozen, minimising
KL(final || lens) averaged over positions and layers on the training split (the first 90% of the text, as
`training.train`). Then reports, per layer, the mean KL to the final distribution on the validation split for the
logit lens and the tuned lens, and writes the translators beside the checkpoint as `<name>.lens.safetensors`
(tied to the checkpoint's sha256; the checkpoint file is not touched).

Recipe (Belrose et al. 2023 and the `tuned-lens` library, scaled to this model): the library's SGD-Nesterov at
lr 1 for 250 steps of 2^18 tokens is tuned for GPT-size models; here Adam with a short linear warm-up and a cosine
decay, `--lr` and `--steps` chosen by measurement (docs/tuned_lens.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import struct
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import load_checkpoint
from model.lens import TunedLens, lens_path, save_lens
from model.transformer import Transformer
from training.plotting import figure
from training.train import get_batch, load_splits

log = logging.getLogger("training.tuned_lens")


class Translators(nn.Module):
    """The trainable (A, b) of layers 0..n_layer-2, at zero (the identity map h + A h + b = h)."""

    def __init__(self, n_layer: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_layer - 1, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layer - 1, d_model))

    def lens(self) -> TunedLens:
        """A detached copy, as the server loads it."""
        return TunedLens(self.weight.detach().clone(), self.bias.detach().clone())


@torch.no_grad()
def stream_and_final(model: Transformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(resid_post of every layer (L, B, T, C), the final log-probabilities (B, T, V)) of inputs x (B, T)."""
    out = model(x, return_resid=True)
    assert out.resid is not None
    stream = torch.stack([r["resid_post"] for r in out.resid])  # (L, B, T, C)
    return stream, F.log_softmax(out.logits.float(), dim=-1)


def lens_kl(model: Transformer, stream: torch.Tensor, logp: torch.Tensor, lens: TunedLens | None) -> torch.Tensor:
    """Mean over positions of KL(final || lens) per layer (L,); `lens` None reads the logit lens."""
    h = lens.apply_all(stream) if lens is not None else stream  # (L, B, T, C)
    logq = F.log_softmax(model.unembed(model.ln_f(h)).float(), dim=-1)  # (L, B, T, V)
    return (logp.exp() * (logp - logq)).sum(-1).flatten(1).mean(-1)  # (L,)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * frac)) * (lr - lr / 10)


def train_lens(
    model: Transformer,
    split: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int = 8,
    seed: int = 0,
    warmup: int = 10,
    progress: bool = True,
) -> tuple[TunedLens, list[float]]:
    """Train translators for the frozen `model` on the byte tensor `split`; (the lens, the loss at every step).

    The loss is KL(final || tuned lens) averaged over positions and over layers 0..L-2 (the last layer is the
    final distribution itself). Batches are drawn from a generator seeded by (seed, step)."""
    if steps < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    config = model.config
    if config.n_layer < 2:
        raise ValueError("a tuned lens needs at least 2 layers (the last one reads the final distribution itself)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    translators = Translators(config.n_layer, config.d_model).to(model.wte.weight.device)
    opt = torch.optim.Adam(translators.parameters(), lr=lr)
    losses: list[float] = []
    bar = _progress(steps, progress)
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x, _ = get_batch(split, config.block_size, batch_size, gen)
        stream, logp = stream_and_final(model, x.to(model.wte.weight.device))
        lens = TunedLens(translators.weight, translators.bias)
        loss = lens_kl(model, stream, logp, lens)[:-1].mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar(step, losses[-1])
    return translators.lens(), losses


def _progress(steps: int, enabled: bool) -> Any:
    """A callback (step, loss) that draws a tqdm bar (or logs every 10%) when enabled."""
    if not enabled:
        return lambda step, loss: None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of training
        every = max(1, steps // 10)
        return lambda step, loss: (step + 1) % every == 0 and log.info("step %d/%d KL %.4f", step + 1, steps, loss)
    bar = tqdm(total=steps, desc="tuned lens", unit="step")

    def update(step: int, loss: float) -> None:
        bar.set_postfix(kl=f"{loss:.4f}", refresh=False)
        bar.update(1)
        if step + 1 == steps:
            bar.close()

    return update


@torch.no_grad()
def validation_kl(
    model: Transformer, split: torch.Tensor, lens: TunedLens, *, max_windows: int = 64, batch_size: int = 8
) -> dict[str, list[float]]:
    """Per layer, the mean KL to the final distribution over every position of up to `max_windows`
    non-overlapping windows of `split` (spread evenly over it), for the logit lens and the tuned lens."""
    T = model.config.block_size
    n = (len(split) - 1) // T
    if n < 1:
        raise ValueError(f"the validation split ({len(split)} bytes) is shorter than one window of {T + 1}")
    starts = torch.linspace(0, (n - 1) * T, min(n, max_windows)).long().unique()  # (W,)
    sums = {"logit": torch.zeros(model.config.n_layer), "tuned": torch.zeros(model.config.n_layer)}
    for b0 in range(0, len(starts), batch_size):
        s = starts[b0 : b0 + batch_size]
        x = split[s[:, None] + torch.arange(T)].long().to(model.wte.weight.device)  # (b, T)
        stream, logp = stream_and_final(model, x)
        sums["logit"] += lens_kl(model, stream, logp, None).cpu() * len(s)
        sums["tuned"] += lens_kl(model, stream, logp, lens).cpu() * len(s)
    return {k: (v / len(starts)).tolist() for k, v in sums.items()}


def format_table(kl: dict[str, list[float]]) -> str:
    """Per-layer KL table (layer, logit, tuned, ratio) and the first-half means."""
    lines = [f"{'layer':>5} {'logit KL':>10} {'tuned KL':>10} {'ratio':>7}"]
    for i, (a, b) in enumerate(zip(kl["logit"], kl["tuned"], strict=True)):
        ratio = f"{a / b:7.2f}" if b > 0 else "      -"
        lines.append(f"{i:>5} {a:10.4f} {b:10.4f} {ratio}")
    half = max(1, len(kl["logit"]) // 2)
    la, lb = sum(kl["logit"][:half]) / half, sum(kl["tuned"][:half]) / half
    lines.append(f"first {half} layers: logit {la:.4f}, tuned {lb:.4f} nats ({la / max(lb, 1e-12):.2f}x lower)")
    return "\n".join(lines)


def plot_lenses(lens_files: list[Path], out: Path) -> None:
    """Per-layer validation KL to final, logit vs tuned lens, of each lens file's model (from its metadata), one
    panel per model, log scale."""
    panels = []
    for path in lens_files:
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["metadata"])
        panels.append((path.name.removesuffix(".lens.safetensors"), meta["val_kl"]))
    with figure(out, ncols=len(panels), figsize=(4.2 * len(panels), 3.6)) as (_, axes):
        for ax, (name, kl) in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
            layers = range(len(kl["logit"]) - 1)  # the last layer is 0 for both: nothing to draw on a log scale
            ax.plot(layers, kl["logit"][:-1], "o-", ms=3, label="logit lens")
            ax.plot(layers, kl["tuned"][:-1], "s-", ms=3, label="tuned lens")
            ax.set_yscale("log")
            ax.set_title(name)
            ax.set_xlabel("layer (resid_post)")
            ax.set_ylabel("KL(final || lens), nats")
            ax.grid(alpha=0.3)
            ax.legend()


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train, report, write the lens file."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint path (.safetensors)")
    p.add_argument("--data", help="text file (UTF-8 bytes); split as in training.train")
    p.add_argument("--plot", type=Path, help="instead of training: plot the validation KL stored in --lens files")
    p.add_argument("--lens", type=Path, nargs="*", default=[], help="lens files to plot (with --plot)")
    p.add_argument("--out", default=None, help="lens file (default: <checkpoint>.lens.safetensors beside it)")
    p.add_argument("--steps", type=int, default=250, help="optimiser steps")
    p.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="windows of block_size bytes per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-windows", type=int, default=64, help="validation windows (non-overlapping)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.plot:
        if not a.lens:
            p.error("--plot needs --lens files")
        plot_lenses(a.lens, a.plot)
        return
    if not a.checkpoint or not a.data:
        p.error("--checkpoint and --data are required (or --plot with --lens)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    t0 = time.monotonic()
    ck = load_checkpoint(a.checkpoint)
    train_split, val_split, data_sha = load_splits(a.data)
    lens, losses = train_lens(
        ck.model, train_split, steps=a.steps, lr=a.lr, batch_size=a.batch_size, seed=a.seed, progress=not a.no_progress
    )
    train_s = time.monotonic() - t0
    kl = validation_kl(ck.model, val_split, lens, max_windows=a.val_windows, batch_size=a.batch_size)
    out = Path(a.out) if a.out else lens_path(a.checkpoint)
    meta = {
        "training_data": Path(a.data).name,
        "training_data_sha256": data_sha,
        "steps": a.steps,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "seed": a.seed,
        "tokens_seen": a.steps * a.batch_size * ck.config.block_size,
        "train_seconds": round(train_s, 1),
        "final_train_kl": losses[-1],
        "val_windows": a.val_windows,
        "val_kl": kl,
    }
    save_lens(out, lens.weight, lens.bias, checkpoint_sha256=ck.sha256, metadata=meta)
    log.info("wrote %s (%.0f s training)", out, train_s)
    print(format_table(kl))
    print(json.dumps({"lens": str(out), "checkpoint_sha256": ck.sha256, **meta}))


if __name__ == "__main__":
    main()
