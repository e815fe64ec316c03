"""Training CLI: python -m training.train --data PATH --out PATH [options].

The first 90% of the file is the train split, the last 10% validation (as nanoGPT).
Batches are drawn from a generator seeded by (seed, step), so a run is deterministic for a seed
and `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer
from training.plotting import figure

log = logging.getLogger("training.train")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run."""

    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    max_steps: int = 2000
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    seed: int = 1337


def load_splits(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Bytes of the file as (train, val) uint8 tensors and the file's sha256."""
    data = Path(path).read_bytes()
    n = int(0.9 * len(data))
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return t[:n], t[n:], hashlib.sha256(data).hexdigest()


def get_batch(
    split: torch.Tensor, block_size: int, batch_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (x, y) of shape (batch, block) with y shifted by one."""
    if len(split) <= block_size + 1:
        raise ValueError(f"split of {len(split)} bytes is too short for block_size {block_size}")
    ix = torch.randint(len(split) - block_size - 1, (batch_size,), generator=gen)
    offsets = ix[:, None] + torch.arange(block_size + 1)  # (B, T+1)
    chunk = split[offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup then cosine decay to min_lr."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (tc.lr - tc.min_lr)


def batch_at(split: torch.Tensor, block_size: int, tc: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of `step`: drawn from a generator seeded by (seed, step), so every run sees the same."""
    gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
    return get_batch(split, block_size, tc.batch_size, gen)


def train_step(
    model: Transformer, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float, grad_clip: float
) -> tuple[float, float]:
    """One optimiser step at learning rate `lr` on inputs x and targets y (B, T).

    Mean cross-entropy, backward, gradient clipping at `grad_clip`, step. Returns (loss, gradient norm before
    clipping) as floats.
    """
    for g in opt.param_groups:
        g["lr"] = lr
    logits = model(x).logits  # (B, T, vocab)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item(), norm.item()


def make_optimizer(model: Transformer, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, tc.beta2), foreach=True)


@torch.no_grad()
def estimate_loss(model: Transformer, split: torch.Tensor, tc: TrainConfig, seed: int) -> float:
    """Mean loss over fixed random batches of a split (same batches at every eval)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(tc.eval_batches):
        x, y = get_batch(split, model.config.block_size, tc.batch_size, gen)
        logits = model(x).logits
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def _opt_tensors(opt: torch.optim.AdamW) -> dict[str, torch.Tensor]:
    out = {}
    for i, (_, state) in enumerate(opt.state_dict()["state"].items()):
        for k, v in state.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_opt_tensors(opt: torch.optim.AdamW, extra: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    sd["state"] = {i: {k: extra[f"opt.{i}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")} for i in range(n_params)}
    opt.load_state_dict(sd)


def plot_history(history: list[dict], path: Path) -> None:
    """Write a PNG of train/val loss against step."""
    with figure(path) as (_, ax):
        ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], label="train (running)")
        evals = [h for h in history if h.get("val_loss") is not None]
        ax.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()


def train(
    data: str | Path,
    out: str | Path,
    mc: ModelConfig,
    tc: TrainConfig,
    *,
    resume: bool = False,
    resume_dropout: float | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
) -> dict:
    """Train a model and write the checkpoint, its resume state, loss history and plot; return a summary.

    On resume the model config comes from the resume file; `resume_dropout` (when given) replaces
    its dropout, the only setting that can change without changing the weights' shapes.
    """
    out = Path(out)
    resume_path = out.with_name(out.stem + ".resume.safetensors")
    train_split, val_split, data_sha = load_splits(data)
    torch.manual_seed(tc.seed)
    model = Transformer(mc)
    opt = make_optimizer(model, tc)
    step, tokens_seen, history, best_val, elapsed = 0, 0, [], float("inf"), 0.0
    if resume and resume_path.exists():
        ck = load_checkpoint(resume_path)
        mc, model = ck.config, ck.model
        if resume_dropout is not None and resume_dropout != mc.dropout:
            mc = dataclasses.replace(mc, dropout=resume_dropout)
            model = Transformer(mc)
            model.load_state_dict(ck.model.state_dict())
            log.info("dropout changed to %s on resume", resume_dropout)
        model.train()
        opt = make_optimizer(model, tc)
        _load_opt_tensors(opt, ck.extra)
        state = ck.metadata["train_state"]
        step, tokens_seen, best_val = state["step"], state["tokens_seen"], state["best_val"]
        history, elapsed = state["history"], state["elapsed_s"]
        log.info("resumed from %s at step %d", resume_path, step)
    model.train()
    log.info("model: %s, %d parameters", mc, model.num_params())
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
    bar = tqdm(total=tc.max_steps, initial=step, disable=not progress, mininterval=5, file=sys.stderr)
    t_last, tok_last = time.monotonic(), tokens_seen
    running = None

    def meta(val_loss: float | None) -> dict:
        return {
            "training_data_sha256": data_sha,
            "training_data": Path(data).name,
            "steps": step,
            "tokens_seen": tokens_seen,
            "val_loss": val_loss,
            "train_config": tc.__dict__,
        }

    def save_resume() -> None:
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "best_val": best_val,
            "history": history,
            "elapsed_s": elapsed + time.monotonic() - t0,
        }
        save_checkpoint(model, resume_path, {**meta(best_val), "train_state": state}, extra=_opt_tensors(opt))

    t0 = time.monotonic()

    def record(val: float | None) -> dict[str, Any]:
        """One history entry at the current step (val_loss None between evaluations)."""
        return {
            "step": step,
            "train_loss": running,
            "val_loss": val,
            "tokens_seen": tokens_seen,
            "elapsed_s": round(elapsed + now - t0, 1),
            "lr": lr_at(step - 1, tc),
        }

    while step < tc.max_steps:
        torch.manual_seed(tc.seed + step)  # dropout
        x, y = batch_at(train_split, mc.block_size, tc, step)
        loss, _ = train_step(model, opt, x, y, lr_at(step, tc), tc.grad_clip)
        step += 1
        tokens_seen += x.numel()
        running = loss if running is None else 0.95 * running + 0.05 * loss
        now = time.monotonic()
        if now - t_last > 5:
            bar.set_postfix(loss=f"{running:.3f}", tok_s=f"{(tokens_seen - tok_last) / (now - t_last):.0f}")
            t_last, tok_last = now, tokens_seen
        bar.update(1)
        done = step == tc.max_steps or (deadline is not None and now > deadline)
        if step % tc.eval_every == 0 or done:
            val = estimate_loss(model, val_split, tc, seed=tc.seed + 7)
            history.append(record(val))
            log.info("step %d train %.4f val %.4f (%.0f s)", step, running, val, elapsed + now - t0)
            if val < best_val:
                best_val = val
                save_checkpoint(model, out, meta(val))
            save_resume()
            (out.with_name(out.stem + ".history.json")).write_text(json.dumps(history, indent=1))
            plot_history(history, out.with_name(out.stem + ".loss.png"))
        elif step % 25 == 0:
            history.append(record(None))
        if done:
            break
    bar.close()
    return {
        "steps": step,
        "best_val_loss": best_val,
        "tokens_seen": tokens_seen,
        "elapsed_s": round(elapsed + time.monotonic() - t0, 1),
        "params": model.num_params(),
    }


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and train."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training text file (UTF-8 bytes)")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    d, t = ModelConfig(), TrainConfig()
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--d-ff", type=int, default=None, help="default 4 * d_model")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        help=f"default {d.dropout}; with --resume, replaces the resumed run's dropout",
    )
    p.add_argument("--attn-dropout", type=float, default=d.attn_dropout)
    p.add_argument("--no-residual", action="store_true", help="drop the shortcut (depth study only)")
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--min-lr", type=float, default=None, help="default lr / 10")
    p.add_argument("--warmup-steps", type=int, default=t.warmup_steps)
    p.add_argument("--max-steps", type=int, default=t.max_steps)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this wall time")
    p.add_argument("--eval-every", type=int, default=t.eval_every)
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--resume", action="store_true", help="continue from <out>.resume.safetensors")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    mc = ModelConfig(
        n_layer=a.n_layer,
        n_head=a.n_head,
        d_model=a.d_model,
        d_ff=a.d_ff or 4 * a.d_model,
        block_size=a.block_size,
        dropout=a.dropout if a.dropout is not None else d.dropout,
        attn_dropout=a.attn_dropout,
        residual=not a.no_residual,
    )
    tc = TrainConfig(
        batch_size=a.batch_size,
        lr=a.lr,
        min_lr=a.min_lr if a.min_lr is not None else a.lr / 10,
        warmup_steps=a.warmup_steps,
        max_steps=a.max_steps,
        eval_every=a.eval_every,
        weight_decay=a.weight_decay,
        seed=a.seed,
    )
    summary = train(
        a.data,
        a.out,
        mc,
        tc,
        resume=a.resume,
        resume_dropout=a.dropout,
        max_minutes=a.max_minutes,
        progress=not a.no_progress,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
