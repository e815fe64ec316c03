"""Depth study: why residual connections matter.

python -m training.depth_study [--data PATH] [--out-dir docs] [--ckpt-dir model/checkpoints] [--quick]
                               [--depths 2 4 8 16 32] [--steps N] [--sweep-steps N] [--lrs 3e-4 1e-3 ...]
                               [--threads 1] [--render-only]

Trains the same narrow model with (residual) and without (plain) the shortcut at several depths, on the same
data and batches, with training.train's optimiser, train step, warm-up + cosine schedule and gradient clipping.
For every (stack, depth) the peak learning rate is picked by a sweep: one short run per candidate, the lowest
val loss wins; then one full-length run at that rate is the reported one. Every full run has the same budget.

The plain stack starts with its attention biased towards the current token (`mimetic_qk_init`): at the usual
initialisation attention is near uniform, so without a shortcut each layer replaces the current token's
vector by an average over the prefix and the identity of the byte to continue from is lost; the plain stack
then learns byte frequencies only, at any depth and learning rate. The sweep's extra runs of a plain stack at
the usual initialisation (`diagnosis_depths`) put that on the page.

Records train and val loss, the byte-frequency (unigram) baseline, and at initialisation and after training
the gradient norm reaching every layer's input ||dL/d resid_pre_l|| on one fixed batch. Writes
<out-dir>/depth_study.{md,json}, three PNG plots, and checkpoints of the deepest plain and residual models.
`--render-only` rewrites the page and plots from an existing <out-dir>/depth_study.json.
"""

from __future__ import annotations

import argparse
import dataclasses
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
BASELINE_TOL = 0.05  # nats/byte: a final loss within this of the byte-frequency baseline learned nothing more


@dataclass(frozen=True)
class StudyConfig:
    """Settings shared by every run of the study."""

    depths: tuple[int, ...] = (2, 4, 8, 16, 32)
    d_model: int = 64
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 16
    steps: int = 400  # every reported run
    sweep_steps: int = 100  # every learning-rate candidate
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    warmup_frac: float = 0.1  # linear warm-up over this fraction of a run, then cosine to lr / 10
    plain_qk_std: float = 0.25  # mimetic_qk_init of the plain stack; 0 turns it off
    diagnosis_depths: tuple[int, ...] = (2,)  # plain depths also swept at the usual initialisation
    log_every: int = 10
    n_evals: int = 6
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

    def train_config(self, lr: float, steps: int | None = None) -> TrainConfig:
        """training.train's optimiser settings for one run of `steps` (default: a reported run's) at peak `lr`."""
        steps = self.steps if steps is None else steps
        return TrainConfig(
            batch_size=self.batch_size,
            lr=lr,
            min_lr=lr / 10,
            warmup_steps=max(1, round(self.warmup_frac * steps)),
            max_steps=steps,
            eval_every=max(1, steps // self.n_evals),
            eval_batches=self.eval_batches,
            seed=self.seed,
        )


QUICK = StudyConfig(
    depths=(2, 4),
    d_model=32,
    block_size=32,
    batch_size=8,
    steps=30,
    sweep_steps=10,
    lrs=(1e-3, 3e-3),
    log_every=5,
    n_evals=3,
    eval_batches=4,
)


def kind_of(residual: bool) -> str:
    """Run label: 'residual' or 'plain'."""
    return "residual" if residual else "plain"


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


@torch.no_grad()
def mimetic_qk_init(model: Transformer, std: float) -> None:
    """Make every block's key projection equal to its query projection, drawn from N(0, std^2).

    Then a position's query is most similar to its own key, q_t . k_t = |W_q x_t|^2 > 0, so attention starts
    on (mostly) the current token instead of spread evenly over the prefix: the mimetic initialisation of
    Trockman & Kolter (2023), "W_q W_k^T ~ I". Biases stay zero; values and outputs keep the usual init.
    """
    for block in model.blocks:
        w = block.attn.c_attn.weight  # (3C, C): rows q, k, v
        c = w.shape[1]
        w[:c].normal_(0.0, std)
        w[c : 2 * c].copy_(w[:c])


def init_model(sc: StudyConfig, depth: int, residual: bool, plain_qk_std: float | None = None) -> Transformer:
    """The initial model of a run: seeded, and for the plain stack with `mimetic_qk_init` (unless std is 0)."""
    std = sc.plain_qk_std if plain_qk_std is None else plain_qk_std
    torch.manual_seed(sc.seed)  # same initial weights for every run of one depth (apart from the plain q/k init)
    model = Transformer(sc.model_config(depth, residual))
    if not residual and std > 0:
        mimetic_qk_init(model, std)
    return model


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


def unigram_baseline(train_split: torch.Tensor, val_split: torch.Tensor) -> dict[str, float]:
    """Cross-entropy (nats/byte) of predicting every byte from the train split's byte frequencies alone.

    Add-one smoothing over the 256 byte values, so a byte absent from the train split costs log(n + 256), not inf.
    """
    counts = torch.bincount(train_split.long(), minlength=256).double() + 1.0  # (256,)
    logp = (counts / counts.sum()).log()

    def ce(split: torch.Tensor) -> float:
        return -logp[split.long()].mean().item()

    return {"train": ce(train_split), "val": ce(val_split)}


def train_run(
    sc: StudyConfig,
    model: Transformer,
    tc: TrainConfig,
    train_split: torch.Tensor,
    val_split: torch.Tensor,
    probe: tuple[torch.Tensor, torch.Tensor] | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Train `model` in place for tc.max_steps with training.train's step; return its record.

    The record holds the loss curves, final train and val loss (fixed batches of each split) and, with a
    `probe` batch, the gradient norm per layer at initialisation and at the end.
    """
    model.train()
    opt = make_optimizer(model, tc)
    grads_init = resid_grad_norms(model, *probe) if probe is not None else None
    curve: list[dict[str, float | int | None]] = []
    val_curve: list[dict[str, float | int | None]] = []
    window: list[float] = []
    norm_window: list[float] = []
    t0 = time.monotonic()
    for step in range(tc.max_steps):
        x, y = batch_at(train_split, model.config.block_size, tc, step)  # same batches for every run
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
                "%s lr %g: step %d/%d batch loss %.4f val %.4f (%.0f s)",
                label,
                tc.lr,
                step + 1,
                tc.max_steps,
                loss,
                val,
                time.monotonic() - t0,
            )
    record: dict[str, Any] = {
        "lr": tc.lr,
        "steps": tc.max_steps,
        "curve": curve,
        "val_curve": val_curve,
        "final_train_loss": _finite(estimate_loss(model, train_split, tc, seed=tc.seed + 7)),
        "final_val_loss": val_curve[-1]["val_loss"],
    }
    if probe is not None:
        grads_end = resid_grad_norms(model, *probe)
        record |= {
            "grad_norms_init": [_finite(g) for g in grads_init],
            "grad_norms_end": [_finite(g) for g in grads_end],
            "grad_ratio_init": _ratio(grads_init),
            "grad_ratio_end": _ratio(grads_end),
        }
    record["wall_s"] = round(time.monotonic() - t0, 2)
    return record


def sweep(
    sc: StudyConfig,
    depth: int,
    residual: bool,
    train_split: torch.Tensor,
    val_split: torch.Tensor,
    plain_qk_std: float | None = None,
) -> list[dict[str, Any]]:
    """One short run (sc.sweep_steps) per candidate learning rate: [{lr, train_loss, val_loss, wall_s}]."""
    out = []
    for lr in sc.lrs:
        model = init_model(sc, depth, residual, plain_qk_std)
        tc = dataclasses.replace(sc.train_config(lr, sc.sweep_steps), eval_every=sc.sweep_steps)  # one eval, at the end
        rec = train_run(
            sc,
            model,
            tc,
            train_split,
            val_split,
            label=f"sweep {kind_of(residual)} {depth}",
        )
        out.append(
            {
                "lr": lr,
                "train_loss": rec["final_train_loss"],
                "val_loss": rec["final_val_loss"],
                "wall_s": rec["wall_s"],
            }
        )
    return out


def best_lr(candidates: list[dict[str, Any]]) -> float:
    """The learning rate of the lowest finite val loss (the first candidate if none is finite)."""
    finite = [c for c in candidates if c["val_loss"] is not None]
    return min(finite, key=lambda c: c["val_loss"])["lr"] if finite else candidates[0]["lr"]


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


def _series(runs: dict[tuple[int, str], dict[str, Any]], kind: str, key: str, depths: list[int]) -> str:
    return ", ".join(f"{fmt_loss(runs[(d, kind)][key])} at depth {d}" for d in depths if (d, kind) in runs)


def findings(result: dict[str, Any]) -> list[str]:
    """Sentences computed from the study's numbers (comparisons, not canned claims)."""
    runs = {(r["depth"], r["kind"]): r for r in result["runs"]}
    depths = sorted({d for d, _ in runs})
    steps = result["config"]["steps"]
    base = result.get("baseline")
    out: list[str] = []
    bad = [f"{k} depth {d}" for (d, k), r in sorted(runs.items()) if r["final_train_loss"] is None]
    if bad:
        out.append(f"Non-finite losses (diverged): {', '.join(bad)}; comparisons below skip them.")

    def train(d: int, k: str) -> float | None:
        return runs[(d, k)]["final_train_loss"] if (d, k) in runs else None

    def val(d: int, k: str) -> float | None:
        return runs[(d, k)]["final_val_loss"] if (d, k) in runs else None

    # degradation: the plain stack's *training* loss against depth
    plain = [(d, train(d, "plain")) for d in depths if train(d, "plain") is not None]
    if len(plain) >= 2:
        best_d, best = min(plain, key=lambda t: t[1])
        deep_d, deep = plain[-1]
        rises = [(a, b) for (a, la), (b, lb) in zip(plain, plain[1:], strict=False) if _compare(lb, la) > 0]
        series = _series(runs, "plain", "final_train_loss", depths)
        if deep_d != best_d and _compare(deep, best) > 0:
            out.append(
                f"Degradation reproduced: without the shortcut the training loss gets worse with depth "
                f"({series}); the deepest plain stack ends {deep - best:.3f} nats/byte above the best plain depth "
                f"({best_d}), on training data, so this is an optimisation failure, not overfitting."
            )
        else:
            out.append(
                f"Degradation not reproduced: the deepest plain stack's training loss is not worse than the best "
                f"shallower one's ({series})."
            )
        if rises and len(rises) < len(plain) - 1:
            out.append(
                "The plain training loss rises between depths "
                + ", ".join(f"{a} and {b}" for a, b in rises)
                + " and does not rise (within "
                f"{SAME_TOL} nats/byte) at the other steps."
            )
    res = [(d, train(d, "residual")) for d in depths if train(d, "residual") is not None]
    if len(res) >= 2:
        lo, hi = res[0][1], res[-1][1]
        series = _series(runs, "residual", "final_train_loss", depths)
        c = _compare(hi, lo)
        if c > 0:
            out.append(
                f"With the shortcut the deepest model trains worse than the shallowest by {hi - lo:.3f} nats/byte "
                f"({series}) after {steps} steps, which does not match the textbook story (deeper residual better "
                "or equal)."
            )
        else:
            out.append(f"With the shortcut depth does not hurt training: {series}.")
    if base is not None:
        stuck = [
            f"{k} depth {d}"
            for (d, k), r in sorted(runs.items())
            if r["final_val_loss"] is not None and r["final_val_loss"] > base["val"] - BASELINE_TOL
        ]
        if stuck:
            out.append(
                f"Within {BASELINE_TOL} nats/byte of the byte-frequency baseline (val {base['val']:.4f}) or above it, "
                f"i.e. learned byte frequencies at most: {', '.join(stuck)}."
            )
    if base is not None:
        flat = [
            f"{k} depth {d}"
            for (d, k), r in sorted(runs.items())
            if r.get("sweep")
            and all(c["val_loss"] is None or c["val_loss"] > base["val"] - BASELINE_TOL for c in r["sweep"])
        ]
        if flat:
            out.append(
                f"No swept learning rate gets {', '.join(flat)} more than {BASELINE_TOL} nats/byte below the "
                "byte-frequency baseline in the sweep, so their best learning rate is picked among runs that learned "
                "nothing."
            )
    for d in depths:
        p, r = val(d, "plain"), val(d, "residual")
        if p is None or r is None:
            continue
        tail = {
            1: f"the shortcut is better by {p - r:.3f} nats/byte",
            0: f"equal within {SAME_TOL} nats/byte",
            -1: f"the plain stack is better by {r - p:.3f} nats/byte, which does not match the textbook story",
        }[_compare(p, r)]
        out.append(
            f"At depth {d} the plain stack's val loss is {fmt_loss(p)} vs {fmt_loss(r)} with the shortcut ({tail})."
        )
    lrs = result["config"]["lrs"]
    edge = [
        f"{k} depth {d} ({r['lr']:g})"
        for (d, k), r in sorted(runs.items())
        if len(lrs) > 1 and r["lr"] in (min(lrs), max(lrs))
    ]
    if edge:
        out.append(
            "The best learning rate is at the edge of the swept grid for: "
            + ", ".join(edge)
            + "; a wider grid might do better there."
        )
    diag = result.get("diagnosis") or []
    for dg in diag:
        best_val = min((c["val_loss"] for c in dg["sweep"] if c["val_loss"] is not None), default=None)
        if best_val is None:
            continue
        ours = val(dg["depth"], "plain")
        out.append(
            f"Plain depth {dg['depth']} at the usual initialisation (no mimetic q/k): best val {fmt_loss(best_val)} "
            f"over the swept learning rates after {result['config']['sweep_steps']} steps"
            + (f", against {fmt_loss(dg['mimetic_best_val'])} with it" if dg.get("mimetic_best_val") else "")
            + (f" (reported run: {fmt_loss(ours)})" if ours is not None else "")
            + "."
        )
    hi = depths[-1]
    if (hi, "plain") in runs and (hi, "residual") in runs:
        p, r = runs[(hi, "plain")], runs[(hi, "residual")]
        out.append(
            f"At initialisation the gradient norm at the input of the {hi}-layer plain stack "
            f"{_flow(p['grad_ratio_init'])}; with the shortcut it {_flow(r['grad_ratio_init'])}."
        )
        out.append(f"After {steps} steps: plain {_flow(p['grad_ratio_end'])}; residual {_flow(r['grad_ratio_end'])}.")
    return out


def render_markdown(result: dict[str, Any]) -> str:
    """The study's report: settings, baseline, the table, the sweep and the computed findings."""
    c, tc = result["config"], result["train_config"]
    base = result["baseline"]
    lrs = ", ".join(f"{lr:g}" for lr in c["lrs"])
    lines = [
        "# Depth study: plain vs residual stacks",
        "",
        f"Data: `{Path(result['data']).name}` (sha256 `{result['data_sha256'][:12]}`), first 90% train, last 10% val. "
        f"Model: d_model={c['d_model']}, n_head={c['n_head']}, d_ff={4 * c['d_model']}, "
        f"block_size={c['block_size']}, batch {c['batch_size']}, byte vocabulary. "
        f"Every reported run: {c['steps']} AdamW steps with training.train's optimiser and train step "
        f"(linear warm-up over {tc['warmup_steps']} steps, cosine to lr/10, gradient clipping at "
        f"{tc['grad_clip']:g}, weight decay {tc['weight_decay']:g}), seed {c['seed']}, the same batches for every run. "
        f"The peak learning rate of each (stack, depth) is the best of {lrs} by val loss after a "
        f"{c['sweep_steps']}-step run (same schedule, scaled). Torch threads: {result['threads']}. "
        f"Total wall time {result['wall_s']:.0f} s (`{result['command']}`).",
        "",
        f"**Byte-frequency baseline** (predict every byte from the train split's byte frequencies, no context): "
        f"train {base['train']:.4f}, val {base['val']:.4f} nats/byte. A model at this loss has learned nothing "
        "beyond how common each byte is.",
        "",
        "**The plain stack** is the same Transformer with `x = F(x)` instead of `x = x + F(x)` in every block "
        "(pre-LN: each sublayer still reads a LayerNorm of its input, and a final LayerNorm precedes the "
        "unembedding). At the usual initialisation (GPT-2: every weight N(0, 0.02)) queries and keys are "
        "small, attention is spread evenly over the prefix, and without a shortcut each layer replaces the "
        "current byte's vector by an average over the prefix: the identity of the byte to continue from is lost "
        "(rank collapse of pure attention, Dong et al. 2021). Such a plain stack learns byte frequencies only: "
        "see the diagnosis row of the sweep below (depth 2, every swept learning rate), and the previous version "
        "of this study (depths 2, 8 and 32 at lr 2e-3, all at the baseline). Moving the LayerNorm after each "
        "sublayer (post-LN) does not change that: a plain stack of either kind is the same alternation of "
        "LayerNorm and sublayers apart from its two ends (development check, depth 2, 300 steps at lr 3e-3: "
        "val 3.377 for both). So the plain stack here starts with each block's key projection equal to its "
        f"query projection, drawn from N(0, {c['plain_qk_std']:g}^2) (mimetic initialisation, Trockman & "
        "Kolter 2023): every position then attends mostly to itself at the start, and training decides what to "
        "mix in. Nothing else differs, and the model code is unchanged (the served plain checkpoint is an "
        "ordinary plain model). The residual stack keeps the usual initialisation: with this q/k init it "
        "trained slower (development check, depth 2, 300 steps at lr 3e-3: val 2.51 against 2.38).",
        "",
        "Development checks of the deeper plain stacks (mimetic q/k as above; run by hand, not in the JSON): "
        "lower learning rates do not help (depth 8, 300 steps: val 3.356 at lr 1e-3, 3.431 at 3e-4, 3.971 at "
        "1e-4; depth 4, whose best swept rate is the grid's lowest, 150 steps: 3.191 at 1e-3, 3.573 at 3e-4), "
        "and neither does dropping GPT-2's depth scaling of the output projections (std "
        "0.02/sqrt(2 x depth), 0.0025 at depth 32): with every output projection at std 0.02 and this study's "
        "400-step schedule, val is 3.338 / 3.344 at depth 8, 3.346 / 3.344 at depth 16 and 3.346 / 3.344 at "
        "depth 32 (lr 1e-3 / 3e-3), although the gradient does not shrink towards the first layer at "
        "initialisation (first/last 6.07, 18.6, 61.9). That depth scaling is why the 32-layer plain stack's "
        "gradient ratio at initialisation below is 0.0152 with or without the q/k init.",
        "",
        "Train and val loss: mean cross-entropy (nats/byte) of the final model on the same "
        f"{c['eval_batches']} fixed batches of each split. Grad ratio: ||dL/d resid_pre|| at the first layer divided "
        "by that at the last layer, on one fixed training batch.",
        "",
        "| depth | stack | best lr | train loss | val loss "
        "| grad ratio first/last (init) | grad ratio first/last (end) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(result["runs"], key=lambda r: (r["depth"], r["residual"])):
        lines.append(
            f"| {r['depth']} | {r['kind']} | {r['lr']:g} | {fmt_loss(r['final_train_loss'])} | "
            f"{fmt_loss(r['final_val_loss'])} | {fmt_ratio(r['grad_ratio_init'])} | "
            f"{fmt_ratio(r['grad_ratio_end'])} |"
        )
    lines += ["", "## What the numbers show", ""]
    lines += [f"- {s}" for s in result["findings"]]
    lines += [
        "",
        f"## Learning-rate sweep (val loss after {c['sweep_steps']} steps)",
        "",
        "| depth | stack | " + " | ".join(f"lr {lr:g}" for lr in c["lrs"]) + " |",
        "|---:|---|" + "---:|" * len(c["lrs"]),
    ]
    rows = [(r["depth"], r["kind"], r["sweep"]) for r in result["runs"]]
    rows += [(d["depth"], "plain, usual init (diagnosis)", d["sweep"]) for d in result.get("diagnosis") or []]
    for depth, kind, sw in sorted(rows, key=lambda t: (t[0], t[1])):
        by_lr = {s["lr"]: s["val_loss"] for s in sw}
        lines.append(f"| {depth} | {kind} | " + " | ".join(fmt_loss(by_lr.get(lr)) for lr in c["lrs"]) + " |")
    lines += [
        "",
        "Plots: `depth_study_depth.png` (final train and val loss against depth, with the baseline), "
        "`depth_study_loss.png` (training curves), `depth_study_grad.png` (gradient norm per layer). "
        "Raw numbers: `depth_study.json`.",
        "",
    ]
    return "\n".join(lines)


def _colors(depths: list[int]) -> dict[int, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return {d: cmap(i / max(1, len(depths) - 1) * 0.85) for i, d in enumerate(depths)}


def _sorted_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(result["runs"], key=lambda r: (r["depth"], r["residual"]))


def plot_depth(result: dict[str, Any], path: Path) -> None:
    """Final train (solid) and val (dotted) loss against depth for both stacks, with the byte-frequency baseline."""
    with figure(path, figsize=(7, 4.5)) as (_, ax):
        for kind, color in (("plain", "tab:red"), ("residual", "tab:blue")):
            rs = [r for r in _sorted_runs(result) if r["kind"] == kind]
            for key, style, what in (("final_train_loss", "o-", "train"), ("final_val_loss", "x:", "val")):
                pts = [(r["depth"], r[key]) for r in rs if r[key] is not None]
                ax.plot([d for d, _ in pts], [v for _, v in pts], style, color=color, label=f"{kind} {what}")
        ax.axhline(result["baseline"]["val"], color="grey", ls="--", label="byte-frequency baseline (val)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["depth"] for r in result["runs"]}))
        ax.get_xaxis().set_major_formatter("{x:.0f}")
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.set_title(f"Final loss after {result['config']['steps']} steps at the best learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def plot_losses(result: dict[str, Any], path: Path) -> None:
    """Training-loss curves, residual (left) and plain (right), one colour per depth, val loss as markers."""
    depths = sorted({r["depth"] for r in result["runs"]})
    col = _colors(depths)
    with figure(path, ncols=2, figsize=(12, 4.5), sharey=True) as (_, axes):
        for ax, residual in ((axes[0], True), (axes[1], False)):
            for r in (r for r in _sorted_runs(result) if r["residual"] is residual):
                pts = [(h["step"], h["train_loss"]) for h in r["curve"] if h["train_loss"] is not None]
                ax.plot([s for s, _ in pts], [v for _, v in pts], color=col[r["depth"]], label=f"depth {r['depth']}")
                vals = [(h["step"], h["val_loss"]) for h in r["val_curve"] if h["val_loss"] is not None]
                ax.plot([s for s, _ in vals], [v for _, v in vals], "o", color=col[r["depth"]], ms=3)
            ax.axhline(result["baseline"]["train"], color="grey", ls="--", lw=1)
            ax.set_xlabel("step")
            ax.set_title(f"{kind_of(residual)} stack: train loss (lines), val (dots)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("cross-entropy (nats/byte)")


def plot_grads(result: dict[str, Any], path: Path) -> None:
    """||dL/d resid_pre_l|| against layer l, at initialisation and after training (log scale)."""
    depths = sorted({r["depth"] for r in result["runs"]})
    col = _colors(depths)
    with figure(path, ncols=2, figsize=(11, 4.5), sharey=True) as (_, axes):
        for ax, key, title in (
            (axes[0], "grad_norms_init", "at initialisation"),
            (axes[1], "grad_norms_end", "after training"),
        ):
            for r in _sorted_runs(result):
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
        axes[1].legend(fontsize=7, ncol=2)


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    """(Re)compute the findings and write the page, the JSON and the plots."""
    result["findings"] = findings(result)
    (out_dir / "depth_study.json").write_text(json.dumps(result, indent=1))
    (out_dir / "depth_study.md").write_text(render_markdown(result))
    plot_depth(result, out_dir / "depth_study_depth.png")
    plot_losses(result, out_dir / "depth_study_loss.png")
    plot_grads(result, out_dir / "depth_study_grad.png")


def run_study(
    data: str | Path, out_dir: str | Path, ckpt_dir: str | Path, sc: StudyConfig, command: str = ""
) -> dict[str, Any]:
    """Sweep and train every (depth, plain/residual) run, write the report, plots, JSON and checkpoints."""
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_split, val_split, data_sha = load_splits(data)
    gen = torch.Generator().manual_seed(sc.seed + 11)
    probe = get_batch(train_split, sc.block_size, sc.batch_size, gen)  # fixed batch for gradient norms
    t0 = time.monotonic()
    deepest = max(sc.depths)
    result: dict[str, Any] = {
        "config": {**dataclasses.asdict(sc), "depths": list(sc.depths), "lrs": list(sc.lrs)},
        "train_config": dataclasses.asdict(sc.train_config(sc.lrs[0])),
        "data": str(data),
        "data_sha256": data_sha,
        "threads": torch.get_num_threads(),
        "command": command,
        "baseline": unigram_baseline(train_split, val_split),
        "diagnosis": [],
        "runs": [],
        "checkpoints": {},
        "complete": False,
    }
    log.info("byte-frequency baseline: train %.4f val %.4f", result["baseline"]["train"], result["baseline"]["val"])
    for depth in sorted(sc.depths):
        for residual in (False, True):
            kind = kind_of(residual)
            t_run = time.monotonic()
            candidates = sweep(sc, depth, residual, train_split, val_split)
            lr = best_lr(candidates)
            log.info("%s depth %d: sweep %s -> lr %g", kind, depth, [c["val_loss"] for c in candidates], lr)
            model = init_model(sc, depth, residual)
            rec = train_run(sc, model, sc.train_config(lr), train_split, val_split, probe, label=f"{kind} {depth}")
            rec = {"depth": depth, "residual": residual, "kind": kind, "params": model.num_params(), **rec}
            rec["sweep"] = candidates
            rec["total_s"] = round(time.monotonic() - t_run, 2)
            result["runs"].append(rec)
            log.info(
                "%s depth %d done: lr %g train %s val %s grad ratio init %s end %s (%.1f s with the sweep)",
                kind,
                depth,
                lr,
                fmt_loss(rec["final_train_loss"]),
                fmt_loss(rec["final_val_loss"]),
                fmt_ratio(rec["grad_ratio_init"]),
                fmt_ratio(rec["grad_ratio_end"]),
                rec["total_s"],
            )
            if depth == deepest:
                path = ckpt_dir / f"{kind}-{depth}.safetensors"
                meta = {
                    "training_data_sha256": data_sha,
                    "training_data": Path(data).name,
                    "steps": sc.steps,
                    "val_loss": rec["final_val_loss"],
                    "train_loss": rec["final_train_loss"],
                    "study": "depth",
                    "train_config": dataclasses.asdict(sc.train_config(lr)),
                    "init": "mimetic q/k" if not residual and sc.plain_qk_std > 0 else "gpt2",
                }
                sha = save_checkpoint(model, path, meta)
                result["checkpoints"][kind] = {"path": str(path), "sha256": sha}
            result["wall_s"] = round(time.monotonic() - t0, 1)
            (out_dir / "depth_study.json").write_text(json.dumps(result, indent=1))  # progress, if stopped early
        if depth in sc.diagnosis_depths and sc.plain_qk_std > 0:
            diag = sweep(sc, depth, False, train_split, val_split, plain_qk_std=0.0)
            ours = next(r for r in result["runs"] if r["depth"] == depth and not r["residual"])
            mimetic = [c["val_loss"] for c in ours["sweep"] if c["val_loss"] is not None]
            result["diagnosis"].append(
                {"depth": depth, "init": "gpt2", "sweep": diag, "mimetic_best_val": min(mimetic, default=None)}
            )
            log.info("diagnosis: plain depth %d at the usual init: %s", depth, [c["val_loss"] for c in diag])
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["complete"] = True
    write_report(result, out_dir)
    log.info("wrote %s/depth_study.{md,json} and plots in %.0f s", out_dir, result["wall_s"])
    return result


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the study (or re-render it), print a JSON summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="any text file; its first 90%% is the train split")
    p.add_argument("--out-dir", default="docs")
    p.add_argument("--ckpt-dir", default="model/checkpoints")
    p.add_argument("--quick", action="store_true", help="tiny settings, about a minute or less")
    p.add_argument("--render-only", action="store_true", help="rewrite page and plots from <out-dir>/depth_study.json")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sweep-steps", type=int, default=None)
    p.add_argument("--lrs", type=float, nargs="+", default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.render_only:
        out_dir = Path(a.out_dir)
        result = json.loads((out_dir / "depth_study.json").read_text())
        write_report(result, out_dir)
    else:
        if a.threads:
            torch.set_num_threads(a.threads)
        sc = QUICK if a.quick else StudyConfig()
        overrides = {
            "depths": tuple(a.depths) if a.depths else None,
            "steps": a.steps,
            "sweep_steps": a.sweep_steps,
            "lrs": tuple(a.lrs) if a.lrs else None,
            "d_model": a.d_model,
            "seed": a.seed,
        }
        sc = dataclasses.replace(sc, **{k: v for k, v in overrides.items() if v is not None})
        if sc.steps < 1 or sc.sweep_steps < 1 or not sc.depths or min(sc.depths) < 1 or not sc.lrs:
            p.error("--steps, --sweep-steps and every depth must be positive, and --lrs non-empty")
        command = "python -m training.depth_study " + " ".join(argv if argv is not None else sys.argv[1:])
        result = run_study(a.data, a.out_dir, a.ckpt_dir, sc, command=command.strip())
    keys = ("depth", "kind", "lr", "final_train_loss", "final_val_loss", "grad_ratio_init", "grad_ratio_end")
    summary = {
        "wall_s": result["wall_s"],
        "baseline": result["baseline"],
        "checkpoints": result["checkpoints"],
        "runs": [{k: r[k] for k in keys} for r in result["runs"]],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
