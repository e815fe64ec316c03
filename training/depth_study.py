"""Depth study: why residual connections matter.

python -m training.depth_study [--data PATH] [--out-dir docs] [--depths 2 8 32] [--steps N] [--d-model 64]
                            [--quick] [--ckpt-dir model/checkpoints]

Trains the same narrow model with (residual) and without (plain) the shortcut at several depths, with
the same data, optimiser (training.train's AdamW, train step, warmup + cosine schedule, gradient clipping), steps,
learning rate and seed; plain and residual runs of one depth even start from identical weights.
At initialisation and after training it records the gradient norm reaching every layer's input
||dL/d resid_pre_l|| on one fixed batch. Writes <out-dir>/depth_study.{md,json}, two PNG plots, and
checkpoints of the deepest plain and residual models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer
from training.plotting import figure
from training.train import (
    TrainConfig,
    batch_at,
    estimate_loss,
    get_batch,
    load_splits,
    lr_at,
    make_optimizer,
    train_step,
)

log = logging.getLogger("training.depth_study")

DEFAULT_DATA = "../shared/data/tinyshakespeare.txt"
SAME_TOL = 0.02  # nats/byte: two losses closer than this count as equal in the generated text


@dataclass(frozen=True)
class StudyConfig:
    """Settings shared by every run of the study."""

    depths: tuple[int, ...] = (2, 8, 32)
    d_model: int = 64
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 16
    steps: int = 600  # whole default study ~17 min here: 6 runs together take ~1.6 s CPU per step (1 thread)
    lr: float = 2e-3
    log_every: int = 10
    n_evals: int = 5
    eval_batches: int = 10
    seed: int = 1337

    def model_config(self, depth: int, residual: bool) -> ModelConfig:
        """The model of one run."""
        return ModelConfig(
            n_layer=depth,
            n_head=self.n_head,
            d_model=self.d_model,
            d_ff=4 * self.d_model,
            block_size=self.block_size,
            dropout=0.0,
            residual=residual,
        )

    def train_config(self) -> TrainConfig:
        """training.train's optimiser settings for this study (same for every run)."""
        return TrainConfig(
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr=self.lr / 10,
            warmup_steps=max(1, min(100, self.steps // 10)),
            max_steps=self.steps,
            eval_every=max(1, self.steps // self.n_evals),
            eval_batches=self.eval_batches,
            seed=self.seed,
        )


QUICK = StudyConfig(
    depths=(2, 4), d_model=32, block_size=32, batch_size=8, steps=30, log_every=5, n_evals=3, eval_batches=4
)


def kind_of(residual: bool) -> str:
    """Run label: 'residual' or 'plain'."""
    return "residual" if residual else "plain"


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def resid_grad_norms(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """||dL/d resid_pre_l|| (Frobenius, over the whole batch) for every layer l, L = mean cross-entropy."""
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        out = model(x, return_resid=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        pre = [t["resid_pre"] for t in out.resid]  # each (B, T, C)
        grads = torch.autograd.grad(loss, pre)
    model.train(was_training)
    return [g.norm().item() for g in grads]


def train_run(
    sc: StudyConfig,
    depth: int,
    residual: bool,
    train_split: torch.Tensor,
    val_split: torch.Tensor,
    probe: tuple[torch.Tensor, torch.Tensor],
) -> tuple[Transformer, dict[str, Any]]:
    """Train one model; return it and its record (loss curves, final losses, gradient norms, wall time)."""
    mc, tc = sc.model_config(depth, residual), sc.train_config()
    torch.manual_seed(sc.seed)  # same initial weights for plain and residual of one depth
    model = Transformer(mc)
    model.train()
    opt = make_optimizer(model, tc)
    grads_init = resid_grad_norms(model, *probe)
    curve: list[dict[str, float | int | None]] = []
    val_curve: list[dict[str, float | int | None]] = []
    window: list[float] = []
    norm_window: list[float] = []
    t0 = time.monotonic()
    for step in range(tc.max_steps):
        x, y = batch_at(train_split, mc.block_size, tc, step)  # same batches for every run
        loss, norm = train_step(model, opt, x, y, lr_at(step, tc), tc.grad_clip)
        window.append(loss)
        norm_window.append(norm)
        done = step + 1 == tc.max_steps
        if (step + 1) % sc.log_every == 0 or done:
            curve.append(
                {
                    "step": step + 1,
                    "train_loss": _finite(sum(window) / len(window)),
                    "grad_norm": _finite(sum(norm_window) / len(norm_window)),
                }
            )
            window, norm_window = [], []
        if (step + 1) % tc.eval_every == 0 or done:
            val = estimate_loss(model, val_split, tc, seed=tc.seed + 7)
            val_curve.append({"step": step + 1, "val_loss": _finite(val)})
            log.info(
                "%s depth %d: step %d/%d batch loss %.4f val %.4f (%.0f s)",
                kind_of(residual),
                depth,
                step + 1,
                tc.max_steps,
                loss,
                val,
                time.monotonic() - t0,
            )
    train_s = time.monotonic() - t0
    final_train = estimate_loss(model, train_split, tc, seed=tc.seed + 7)
    final_val = val_curve[-1]["val_loss"]
    grads_end = resid_grad_norms(model, *probe)
    record = {
        "depth": depth,
        "residual": residual,
        "kind": kind_of(residual),
        "params": model.num_params(),
        "curve": curve,
        "val_curve": val_curve,
        "final_train_loss": _finite(final_train),
        "final_val_loss": final_val,
        "grad_norms_init": [_finite(g) for g in grads_init],
        "grad_norms_end": [_finite(g) for g in grads_end],
        "grad_ratio_init": _ratio(grads_init),
        "grad_ratio_end": _ratio(grads_end),
        "train_s": round(train_s, 2),
        "wall_s": round(time.monotonic() - t0, 2),
    }
    return model, record


def _ratio(norms: list[float]) -> float | None:
    """First-layer over last-layer gradient norm (None if not finite)."""
    if not norms or not all(math.isfinite(n) for n in norms) or norms[-1] == 0:
        return None
    return norms[0] / norms[-1]


def fmt_loss(v: float | None) -> str:
    """Loss as written in the table."""
    return "n/a" if v is None else f"{v:.4f}"


def fmt_ratio(v: float | None) -> str:
    """Gradient-norm ratio as written in the table."""
    return "n/a" if v is None else f"{v:.3g}"


def _flow(r: float | None) -> str:
    if r is None:
        return "is not finite"
    if r == 0:
        return "vanishes: the first layer receives a gradient of exactly 0 (float32 underflow)"
    if r < 0.1:
        return f"shrinks by {1 / r:.3g}x from the last layer down to the first"
    if r > 10:
        return f"grows by {r:.3g}x from the last layer down to the first"
    return f"stays within a factor of 10 across layers (first/last = {r:.3g})"


def _compare(a: float, b: float) -> int:
    """+1 if a > b beyond SAME_TOL, -1 if a < b beyond it, 0 if equal within it."""
    return 0 if abs(a - b) <= SAME_TOL else (1 if a > b else -1)


def findings(result: dict[str, Any]) -> list[str]:
    """Sentences computed from the study's numbers (comparisons, not canned claims)."""
    runs = {(r["depth"], r["kind"]): r for r in result["runs"]}
    depths = sorted({d for d, _ in runs})
    steps = result["config"]["steps"]
    out: list[str] = []
    bad = [f"{k} depth {d}" for (d, k), r in sorted(runs.items()) if r["final_val_loss"] is None]
    if bad:
        out.append(f"Non-finite losses (diverged): {', '.join(bad)}; comparisons below skip them.")

    def val(d: int, k: str) -> float | None:
        return runs[(d, k)]["final_val_loss"]

    for d in depths:
        p, r = val(d, "plain"), val(d, "residual")
        if p is None or r is None:
            continue
        c = _compare(p, r)
        tail = {
            1: f"the shortcut is better by {p - r:.3f} nats/byte",
            0: f"equal within {SAME_TOL} nats/byte",
            -1: f"the plain stack is better by {r - p:.3f} nats/byte, which does not match the textbook story",
        }[c]
        out.append(
            f"At depth {d} the plain stack's val loss is {fmt_loss(p)} vs {fmt_loss(r)} with the shortcut ({tail})."
        )
    lo, hi = depths[0], depths[-1]
    if lo != hi:
        for kind in ("plain", "residual"):
            a, b = val(lo, kind), val(hi, kind)
            if a is None or b is None:
                continue
            c = _compare(b, a)
            nums = f"val {fmt_loss(b)} at depth {hi} vs {fmt_loss(a)} at depth {lo}"
            if kind == "plain":
                text = (
                    f"Without the shortcut, depth hurts: {nums}, as the textbook story predicts."
                    if c > 0
                    else f"Unlike the textbook story, the deeper plain stack is not worse than the shallow one: {nums}."
                )
            else:
                text = (
                    f"With the shortcut, the deeper model is worse: {nums} after {steps} steps, which does not "
                    f"match the textbook story (deeper residual better or equal)."
                    if c > 0
                    else f"With the shortcut, depth does not hurt: {nums}, as the textbook story predicts."
                )
            out.append(text)
    p, r = runs[(hi, "plain")], runs[(hi, "residual")]
    out.append(
        f"At initialisation the gradient norm at the input of the {hi}-layer plain stack "
        f"{_flow(p['grad_ratio_init'])}; with the shortcut it {_flow(r['grad_ratio_init'])}."
    )
    out.append(f"After {steps} steps: plain {_flow(p['grad_ratio_end'])}; residual {_flow(r['grad_ratio_end'])}.")
    return out


def render_markdown(result: dict[str, Any]) -> str:
    """The study's report: settings, the table and the computed findings."""
    c = result["config"]
    lines = [
        "# Depth study: plain vs residual stacks",
        "",
        f"Data: `{result['data']}` (sha256 `{result['data_sha256'][:12]}`), train split. "
        f"Model: d_model={c['d_model']}, n_head={c['n_head']}, d_ff={4 * c['d_model']}, "
        f"block_size={c['block_size']}, batch {c['batch_size']}. "
        f"Every run: {c['steps']} AdamW steps (training.train's optimiser and train step), "
        f"the same lr={c['lr']:g} for plain and "
        f"residual (warmup {result['train_config']['warmup_steps']} steps, cosine to {c['lr'] / 10:g}), "
        f"gradient clipping at {result['train_config']['grad_clip']:g}, seed {c['seed']} (same initial weights and "
        f"batches for plain and residual of one depth). Total wall time {result['wall_s']:.0f} s.",
        "",
        "Train and val loss: mean cross-entropy (nats/byte) of the final model on the same "
        f"{c['eval_batches']} fixed batches of each split. Grad ratio: ||dL/d resid_pre|| at the first layer divided "
        "by that at the last layer, on one fixed training batch.",
        "",
        "| depth | stack | train loss | val loss | grad ratio first/last (init) | grad ratio first/last (end) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in sorted(result["runs"], key=lambda r: (r["depth"], r["residual"])):
        lines.append(
            f"| {r['depth']} | {r['kind']} | {fmt_loss(r['final_train_loss'])} | "
            f"{fmt_loss(r['final_val_loss'])} | {fmt_ratio(r['grad_ratio_init'])} | "
            f"{fmt_ratio(r['grad_ratio_end'])} |"
        )
    lines += ["", "## What the numbers show", ""]
    lines += [f"- {s}" for s in result["findings"]]
    lines += ["", "Plots: `depth_study_loss.png` (loss curves), `depth_study_grad.png` (gradient norm per layer).", ""]
    return "\n".join(lines)


def _colors(depths: list[int]) -> dict[int, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return {d: cmap(i / max(1, len(depths) - 1) * 0.85) for i, d in enumerate(depths)}


def plot_losses(result: dict[str, Any], path: Path) -> None:
    """Training-loss curves (solid residual, dashed plain) plus val points, one colour per depth."""
    depths = sorted({r["depth"] for r in result["runs"]})
    col = _colors(depths)
    with figure(path, figsize=(8, 5)) as (_, ax):
        for r in sorted(result["runs"], key=lambda r: (r["depth"], r["residual"])):
            style = "-" if r["residual"] else "--"
            pts = [(h["step"], h["train_loss"]) for h in r["curve"] if h["train_loss"] is not None]
            ax.plot(
                [s for s, _ in pts],
                [v for _, v in pts],
                style,
                color=col[r["depth"]],
                label=f"{r['kind']} depth {r['depth']}",
            )
            vals = [(h["step"], h["val_loss"]) for h in r["val_curve"] if h["val_loss"] is not None]
            ax.plot([s for s, _ in vals], [v for _, v in vals], "o" if r["residual"] else "x", color=col[r["depth"]])
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.set_title("Training loss (lines) and val loss (markers)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def plot_grads(result: dict[str, Any], path: Path) -> None:
    """||dL/d resid_pre_l|| against layer l, at initialisation and after training (log scale)."""
    depths = sorted({r["depth"] for r in result["runs"]})
    col = _colors(depths)
    with figure(path, ncols=2, figsize=(11, 4.5), sharey=True) as (_, axes):
        for ax, key, title in (
            (axes[0], "grad_norms_init", "at initialisation"),
            (axes[1], "grad_norms_end", "after training"),
        ):
            for r in sorted(result["runs"], key=lambda r: (r["depth"], r["residual"])):
                pts = [(i, g) for i, g in enumerate(r[key]) if g is not None and g > 0]
                ax.plot(
                    [i for i, _ in pts],
                    [g for _, g in pts],
                    "-" if r["residual"] else "--",
                    marker=".",
                    color=col[r["depth"]],
                    label=f"{r['kind']} depth {r['depth']}",
                )
            ax.set_yscale("log")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("layer l")
            ax.set_title(f"||dL/d resid_pre_l|| {title}")
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel("gradient norm")
        axes[1].legend(fontsize=8)


def run_study(data: str | Path, out_dir: str | Path, ckpt_dir: str | Path, sc: StudyConfig) -> dict[str, Any]:
    """Train every (depth, plain/residual) run, write the report, plots, JSON and checkpoints; return the result."""
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_split, val_split, data_sha = load_splits(data)
    gen = torch.Generator().manual_seed(sc.seed + 11)
    probe = get_batch(train_split, sc.block_size, sc.batch_size, gen)  # fixed batch for gradient norms
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    deepest = max(sc.depths)
    ckpts: dict[str, dict[str, str]] = {}
    for depth in sorted(sc.depths):
        for residual in (False, True):
            log.info("training %s depth %d (%d steps)", kind_of(residual), depth, sc.steps)
            model, rec = train_run(sc, depth, residual, train_split, val_split, probe)
            runs.append(rec)
            log.info(
                "%s depth %d done: train %s val %s grad ratio init %s end %s (%.1f s)",
                rec["kind"],
                depth,
                fmt_loss(rec["final_train_loss"]),
                fmt_loss(rec["final_val_loss"]),
                fmt_ratio(rec["grad_ratio_init"]),
                fmt_ratio(rec["grad_ratio_end"]),
                rec["wall_s"],
            )
            if depth == deepest:
                path = ckpt_dir / f"{rec['kind']}-{depth}.safetensors"
                meta = {
                    "training_data_sha256": data_sha,
                    "training_data": Path(data).name,
                    "steps": sc.steps,
                    "val_loss": rec["final_val_loss"],
                    "train_loss": rec["final_train_loss"],
                    "study": "depth",
                    "train_config": dataclasses.asdict(sc.train_config()),
                }
                sha = save_checkpoint(model, path, meta)
                ckpts[rec["kind"]] = {"path": str(path), "sha256": sha}
    result: dict[str, Any] = {
        "config": {**dataclasses.asdict(sc), "depths": list(sc.depths)},
        "train_config": dataclasses.asdict(sc.train_config()),
        "data": str(data),
        "data_sha256": data_sha,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "checkpoints": ckpts,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    result["findings"] = findings(result)
    (out_dir / "depth_study.json").write_text(json.dumps(result, indent=1))
    (out_dir / "depth_study.md").write_text(render_markdown(result))
    plot_losses(result, out_dir / "depth_study_loss.png")
    plot_grads(result, out_dir / "depth_study_grad.png")
    log.info("wrote %s/depth_study.{md,json,_loss.png,_grad.png} in %.0f s", out_dir, result["wall_s"])
    return result


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the study, print a JSON summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="any text file; its train split is used")
    p.add_argument("--out-dir", default="docs")
    p.add_argument("--ckpt-dir", default="model/checkpoints")
    p.add_argument("--quick", action="store_true", help="tiny settings, about a minute or less")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    sc = QUICK if a.quick else StudyConfig()
    overrides = {
        "depths": tuple(a.depths) if a.depths else None,
        "steps": a.steps,
        "d_model": a.d_model,
        "lr": a.lr,
        "seed": a.seed,
    }
    sc = dataclasses.replace(sc, **{k: v for k, v in overrides.items() if v is not None})
    if sc.steps < 1 or not sc.depths or min(sc.depths) < 1:
        p.error("--steps and every depth must be positive")
    result = run_study(a.data, a.out_dir, a.ckpt_dir, sc)
    print(
        json.dumps(
            {
                "wall_s": result["wall_s"],
                "checkpoints": result["checkpoints"],
                "runs": [
                    {
                        k: r[k]
                        for k in (
                            "depth",
                            "kind",
                            "final_train_loss",
                            "final_val_loss",
                            "grad_ratio_init",
                            "grad_ratio_end",
                            "wall_s",
                        )
                    }
                    for r in result["runs"]
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
