"""Residual-stream diagnostics for one prompt: norms, update ratios, logit and tuned lens, gradients, ablations.

The computation core of the `/diagnostics` endpoint; it knows nothing about HTTP.

Numerical conventions:
- Every ratio a/b of norms is a / max(b, EPS) with EPS = 1e-8: a zero denominator gives 0 when the numerator
  is 0 too, and a large but finite number otherwise. A cosine with a zero vector is 0 for the same reason
  (dot / max(|a| |b|, EPS)). Logit-lens KL divergences are clamped at 0 (float round-off can go a hair below).
- Statistics are computed in float32 (or the model's wider dtype) and rounded to 6 significant digits at the end;
  a non-finite value (only possible if the model itself overflows) becomes None, so the result is always valid JSON.
"""

from __future__ import annotations

import contextlib
import logging
import math
import textwrap
from collections.abc import Generator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.edits import Intervention, StreamEdits
from model.lens import TunedLens
from model.tokenizer import token_text
from model.transformer import RESID_NAMES, Transformer, in_slices, run_to_end

log = logging.getLogger(__name__)

EPS = 1e-8
SIG_DIGITS = 6
COMPONENTS = ("block", "attn", "mlp")
UPDATE_PARTS = ("attn", "mlp", "block")
_EIGHTHS = " ▏▎▍▌▋▊▉"  # partial bar cells, 0/8 .. 7/8
MIN_BAR = 4  # the text report drops its lens top-1 columns before its bar gets narrower than this


@dataclass(frozen=True)
class DiagnosticsOptions:
    """What to compute beyond the per-layer norms (which are always there)."""

    per_token: bool = False
    logit_lens: int = 0
    tuned_lens: int = 0  # top-K of the tuned lens (needs the model's `TunedLens`)
    gradients: bool = False
    ablation: bool = False
    intervention: Intervention | None = None  # applied to every forward (ablations are on top of it)

    def __post_init__(self) -> None:
        for name in ("per_token", "gradients", "ablation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DiagnosticsOptions.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("logit_lens", "tuned_lens"):
            k = getattr(self, name)
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise ValueError(f"DiagnosticsOptions.{name} must be an int >= 0, got {k!r}")

    def validate_for(self, config: ModelConfig, lens: TunedLens | None = None) -> None:
        """Check the options against a model (lens sizes at most vocab_size, a tuned lens if asked for, an
        intervention it can apply)."""
        for name in ("logit_lens", "tuned_lens"):
            if getattr(self, name) > config.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} exceeds the vocabulary size {config.vocab_size}")
        if self.tuned_lens > 0 and lens is None:
            raise ValueError("tuned_lens needs the model's tuned lens (python -m training.tuned_lens trains one)")
        if lens is not None and lens.n_layer != config.n_layer:
            raise ValueError(f"the tuned lens reads {lens.n_layer} layers, the model has {config.n_layer}")
        problem = self.intervention.problem(config.n_layer) if self.intervention is not None else None
        if problem is not None:
            raise ValueError(problem[1])


def run_diagnostics(
    model: Transformer,
    ids: list[int],
    opts: DiagnosticsOptions,
    model_info: Mapping[str, Any] | None = None,
    lens: TunedLens | None = None,
) -> dict[str, Any]:
    """Diagnose the residual stream of `model` on one prompt; a JSON-serialisable dict (see module docstring).
    `lens`: the model's tuned lens, needed for `opts.tuned_lens`."""
    return run_to_end(iter_diagnostics(model, ids, opts, model_info, lens))


def iter_diagnostics(
    model: Transformer,
    ids: list[int],
    opts: DiagnosticsOptions,
    model_info: Mapping[str, Any] | None = None,
    lens: TunedLens | None = None,
) -> Generator[None, None, dict[str, Any]]:
    """`run_diagnostics` as a generator that yields after each block of every forward pass
    (`Transformer.forward_steps`) and of the backward, and after each forward (so a server can interleave it with
    batched decoding, a block at a time); its return value is the result. No grad/inference context is held across a
    yield."""
    config = model.config
    opts.validate_for(config, lens)
    _check_ids(ids, config)
    if model.training and config.dropout > 0:
        raise ValueError("diagnostics need deterministic forwards: call model.eval() first (dropout > 0)")
    n_tokens, n_layer = len(ids), config.n_layer
    notes: list[str] = []
    skipped = [name for name, on in (("gradients", opts.gradients), ("ablation", opts.ablation)) if on]
    if n_tokens < 2 and skipped:
        notes.append(f"{' and '.join(skipped)} skipped: they need a loss, so at least 2 tokens (t predicts t+1)")

    device = model.wte.weight.device
    edits = opts.intervention.compile(n_layer, device, n_prompt=n_tokens) if opts.intervention else None  # one row
    grads: list[torch.Tensor] | None = None
    if opts.gradients and n_tokens >= 2:
        resid, logits, grads = yield from _forward_with_grads(model, ids, edits)
    else:
        idx = _as_batch(model, ids)  # (1, T)
        out = yield from in_slices(model.forward_steps(idx, return_resid=True, edits=edits), torch.inference_mode)
        assert out.resid is not None
        resid, logits = out.resid, out.logits
    yield

    ablated = None
    if opts.ablation and n_tokens >= 2:
        losses = []
        for layer in range(n_layer):
            for part in COMPONENTS:
                idx = _as_batch(model, ids)  # (1, T)
                ablation = Intervention(skip=((layer, part),)).compile(n_layer, device)  # on top of the request's
                steps = model.forward_steps(idx, edits=ablation.combine(edits))
                logits_ab = (yield from in_slices(steps, torch.inference_mode)).logits  # (1, T, V)
                with torch.inference_mode():
                    losses.append(_prompt_loss(logits_ab, idx))
                yield
        ablated = torch.stack(losses).view(n_layer, len(COMPONENTS))  # (L, 3)

    with torch.inference_mode():
        idx = _as_batch(model, ids)  # (1, T)
        clean_loss = _prompt_loss(logits, idx) if n_tokens >= 2 else None  # () or None
        stats = _layer_stats(resid)
        grad_norms = None
        if grads is not None:
            g = torch.stack([t[0] for t in grads]).float()  # (L, T, C)
            grad_norms = torch.linalg.vector_norm(g, dim=-1).mean(-1).tolist()  # L
        logit_lens = _logit_lens(model, resid, logits, opts.logit_lens) if opts.logit_lens > 0 else None
        tuned_lens = _logit_lens(model, resid, logits, opts.tuned_lens, lens) if opts.tuned_lens > 0 else None
        delta = None
        if ablated is not None and clean_loss is not None:
            delta = (ablated - clean_loss).tolist()  # (L, 3)
        loss = clean_loss.item() if clean_loss is not None else None

    touched = opts.intervention.layers() if opts.intervention else set()
    layers: list[dict[str, Any]] = []
    for layer in range(n_layer):
        entry: dict[str, Any] = {"layer": layer, "intervened": layer in touched}
        for name in RESID_NAMES:
            norms = stats.norms[name][layer]
            entry[name] = {"mean": norms.mean().item(), "max": norms.max().item(), "first": norms[0].item()}
            if opts.per_token:
                entry[name]["per_token"] = norms.tolist()
        entry["update_ratio"] = {part: stats.update_ratio[part][layer].mean().item() for part in UPDATE_PARTS}
        if opts.per_token:
            entry["update_ratio"]["per_token"] = {
                part: stats.update_ratio[part][layer].tolist() for part in UPDATE_PARTS
            }
        entry["cos_update"] = stats.cos_update[layer].item()
        entry["block_influence"] = stats.block_influence[layer].item()
        if logit_lens is not None:
            entry["logit_lens"] = logit_lens[layer]
        if tuned_lens is not None:
            entry["tuned_lens"] = tuned_lens[layer]
        if opts.gradients:
            entry["grad_norm"] = grad_norms[layer] if grad_norms is not None else None
        if opts.ablation:
            entry["delta_loss"] = dict(zip(COMPONENTS, delta[layer], strict=True)) if delta is not None else None
        layers.append(entry)

    result: dict[str, Any] = {
        "tokens": {"ids": list(ids), "text": [_token_text(i) for i in ids]},
        "n_tokens": n_tokens,
        "loss": loss,
        "options": {**asdict(opts), "intervention": opts.intervention.to_dict() if opts.intervention else None},
        "layers": layers,
        "summary": _summary(layers, n_layer, with_ablation=delta is not None, ablation_asked=opts.ablation),
        "notes": notes,
    }
    if model_info is not None:
        result["model"] = dict(model_info)
    return _clean(result)


def residual_norms_last(resid: list[dict[str, torch.Tensor]], row: int = 0, position: int = -1) -> list[float]:
    """L2 norm of resid_post at one position (default: the last) of one batch row, for every layer."""
    with torch.no_grad():
        last = torch.stack([r["resid_post"][row, position] for r in resid]).float()  # (L, C)
        return torch.linalg.vector_norm(last, dim=-1).tolist()


def stream_norms(stream: torch.Tensor) -> torch.Tensor:
    """L2 norms (L + 1, R) of a residual stream (L + 1, R, C): the embedding, then resid_post of every layer."""
    return torch.linalg.vector_norm(stream.float(), dim=-1)


def stream_trace(
    model: Transformer,
    stream: torch.Tensor,
    lens_top: list[int],
    lenses: list[str] | None = None,
    tuned: TunedLens | None = None,
) -> list[dict[str, Any]]:
    """The per-token trace of R positions from their residual stream `stream` (L + 1, R, C): the embedding,
    then resid_post of every layer.

    Per row: `resid_norm` (L,) = |resid_post|, `update_ratio` (L,) = |resid_post - resid_pre| / |resid_pre| (as
    `/diagnostics` computes them per token) and, where lens_top[r] > 0, `logit_lens` (L lists of the top tokens
    of ln_f(resid_post) unembedded, with their probabilities) and `lens`: lenses[r] ("logit" by default), or
    "tuned", which reads ln_f(tuned.apply(layer, resid_post)) instead.
    """
    lenses = lenses if lenses is not None else ["logit"] * len(lens_top)
    with torch.inference_mode():
        s = stream.float()
        norms = stream_norms(s)  # (L + 1, R)
        ratio = torch.linalg.vector_norm(s[1:] - s[:-1], dim=-1) / norms[:-1].clamp_min(EPS)  # (L, R)
        rows = [
            {"resid_norm": n, "update_ratio": u} for n, u in zip(norms[1:].T.tolist(), ratio.T.tolist(), strict=True)
        ]
        k = max(lens_top, default=0)
        if k > 0:
            h = s[1:]  # (L, R, C)
            if "tuned" in lenses:
                if tuned is None:
                    raise ValueError("a trace through the tuned lens needs the model's TunedLens")
                wants = torch.tensor([name == "tuned" for name in lenses], device=h.device)  # (R,)
                h = torch.where(wants[None, :, None], tuned.apply_all(h.to(tuned.weight.dtype)).to(h.dtype), h)
            probs = F.softmax(model.unembed(model.ln_f(h)).float(), dim=-1)  # (L, R, V)
            top_p, top_i = probs.topk(k, dim=-1)  # (L, R, k)
            top_p_l, top_i_l = top_p.transpose(0, 1).tolist(), top_i.transpose(0, 1).tolist()  # (R, L, k)
            for r, (row, kr, name) in enumerate(zip(rows, lens_top, lenses, strict=True)):
                if kr > 0:
                    row["logit_lens"] = [
                        [{"id": i, "text": _token_text(i), "prob": p} for i, p in zip(ids[:kr], ps[:kr], strict=True)]
                        for ids, ps in zip(top_i_l[r], top_p_l[r], strict=True)
                    ]
                    row["lens"] = name
    return rows


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 2 points or a constant input."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = _average_ranks(x), _average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def render_text(result: dict[str, Any], width: int = 80) -> str:
    """Plain-text report of a `run_diagnostics` result: header, one row per layer with a bar chart, summary."""
    layers = result["layers"]
    first = layers[0] if layers else {}
    cols: list[tuple[str, int, Any]] = [
        ("layer", 5, lambda e: f"{e['layer']}{'*' if e.get('intervened') else ''}"),
        ("|post|", 8, lambda e: e["resid_post"]["mean"]),
        ("upd", 7, lambda e: e["update_ratio"]["block"]),
        ("attn", 7, lambda e: e["update_ratio"]["attn"]),
        ("mlp", 7, lambda e: e["update_ratio"]["mlp"]),
        ("BI", 8, lambda e: e["block_influence"]),
    ]
    if "grad_norm" in first:
        cols.append(("grad", 8, lambda e: e["grad_norm"]))
    if "delta_loss" in first:
        cols.append(("dL blk", 8, lambda e: e["delta_loss"]["block"] if e["delta_loss"] else None))
    if "logit_lens" in first:
        cols.append(("KL log", 6, lambda e: e["logit_lens"]["kl_to_final"]))
    if "tuned_lens" in first:
        cols.append(("KL tun", 6, lambda e: e["tuned_lens"]["kl_to_final"]))
    tops = [(name, key) for name, key in (("lens", "logit_lens"), ("tuned", "tuned_lens")) if key in first]
    for name, key in tops:
        cols.append((name, 6, lambda e, key=key: _top1(e[key])))
    while tops and sum(w for _, w, _ in cols) + len(cols) + MIN_BAR > width:  # top-1 tokens go before the bar
        name, _ = tops.pop()
        cols = [c for c in cols if c[0] != name]
    shown = {name for name, _, _ in cols}
    used = sum(w for _, w, _ in cols) + len(cols) - 1
    bar_width = max(width - used - 1, 0)
    bar_values = [e["update_ratio"]["block"] or 0.0 for e in layers]
    top = max(bar_values, default=0.0)

    loss = result.get("loss")
    summary = result.get("summary", {})
    n_tokens = result["n_tokens"]
    loss_text = f"{_fmt(loss)} nats" if loss is not None else "n/a"
    prose = [
        f"diagnostics: {n_tokens} token{'s' if n_tokens != 1 else ''}, loss {loss_text}, "
        f"norm growth {_fmt(summary.get('norm_growth_per_layer'))}x/layer",
        "columns: |post| mean resid_post norm; upd/attn/mlp update ratios; BI block influence"
        + ("; grad |dL/d resid_pre|" if "grad_norm" in first else "")
        + ("; dL blk loss change with the block ablated" if "delta_loss" in first else "")
        + ("; KL log logit lens's KL to final at the last token" if "logit_lens" in first else "")
        + ("; KL tun tuned lens's" if "tuned_lens" in first else "")
        + ("; lens logit-lens top-1" if "lens" in shown else "")
        + ("; tuned tuned-lens top-1" if "tuned" in shown else "")
        + ("; bar: upd" if bar_width else ""),
    ]
    iv = result.get("options", {}).get("intervention")
    if iv:
        prose.insert(1, "intervention (* layers): " + _describe_intervention(iv))
    info = result.get("model")
    if info and "name" in info:
        stack = {True: "residual", False: "plain"}.get(info.get("residual"), "")
        about = ", ".join(x for x in (f"{info['n_layer']} layers" if "n_layer" in info else "", stack) if x)
        prose.insert(1, f"model: {info['name']}" + (f" ({about})" if about else ""))
    lines = [w for line in prose for w in textwrap.wrap(line, width, subsequent_indent="  ")]
    lines.insert(1, _clip("prompt: " + repr("".join(result["tokens"]["text"])), width))
    lines += ["", _clip(" ".join(f"{name:>{w}}" for name, w, _ in cols), width)]
    for entry, value in zip(layers, bar_values, strict=True):
        row = " ".join(_cell(get(entry), w) for _, w, get in cols)
        if bar_width:
            row += " " + _bar(value, top, bar_width)
        lines.append(_clip(row.rstrip(), width))
    lines.append("")
    tail: list[str] = []
    largest = summary.get("largest_update_layer")
    if largest is not None:
        ratio = _fmt(layers[largest]["update_ratio"]["block"])
        tail.append(f"largest update: layer {largest} (block update ratio {ratio})")
    if "spearman_bi_vs_delta_loss" in summary:
        tail.append(f"spearman(BI, delta_loss.block) across layers: {_fmt(summary['spearman_bi_vs_delta_loss'])}")
    tail += ["note: " + note for note in result.get("notes", [])]
    lines += [w for line in tail for w in textwrap.wrap(line, width, subsequent_indent="  ")]
    return "\n".join(lines) + "\n"


def _describe_intervention(iv: Mapping[str, Any]) -> str:
    """'skip 3.mlp, 7.block; scale 0.attn x0.5' from the JSON form."""
    parts = []
    if iv.get("skip"):
        parts.append("skip " + ", ".join(f"{e['layer']}.{e['part']}" for e in iv["skip"]))
    if iv.get("scale"):
        parts.append("scale " + ", ".join(f"{e['layer']}.{e['part']} x{_fmt(e['factor'])}" for e in iv["scale"]))
    return "; ".join(parts)


def _check_ids(ids: list[int], config: ModelConfig) -> None:
    if not isinstance(ids, list | tuple) or not ids:
        raise ValueError("diagnostics need a non-empty list of token ids")
    if len(ids) > config.block_size:
        raise ValueError(f"{len(ids)} tokens exceed block_size {config.block_size}")
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < config.vocab_size:
            raise ValueError(f"token id {i!r} is not an int in 0..{config.vocab_size - 1}")


def _as_batch(model: Transformer, ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=model.wte.weight.device)  # (1, T)


def _prompt_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the prompt (row 0)."""
    return F.cross_entropy(logits[0, :-1].float(), idx[0, 1:])  # ()


def _forward_with_grads(
    model: Transformer, ids: list[int], edits: StreamEdits | None
) -> Generator[None, None, tuple[list[dict[str, torch.Tensor]], torch.Tensor, list[torch.Tensor]]]:
    """One forward with grad on, then dL/d resid_pre for every layer; parameters' .grad is never touched.

    Yields after each block of the forward (`Transformer.forward_steps`, each block with grad on) and after each
    block's backward (the chain rule, one block at a time: the gradient at a block's input is the gradient at its
    output pulled back through that block alone), so a server interleaving it with decoding never waits for a whole
    forward or backward pass."""
    with torch.inference_mode(False):
        idx = _as_batch(model, ids)  # (1, T), a normal tensor even if the caller is in inference mode
    out = yield from in_slices(model.forward_steps(idx, return_resid=True, edits=edits), _with_grad)
    assert out.resid is not None
    with _with_grad():
        pre = [r["resid_pre"] for r in out.resid]  # L x (1, T, C), all in the graph
        if not pre[0].requires_grad:
            raise ValueError("gradients need the model's parameters to require grad (they only carry the graph)")
        loss = _prompt_loss(out.logits, idx)  # ()
    yield
    grads: list[torch.Tensor] = []
    output, grad = loss, None  # start from dL/dL
    for layer in reversed(range(len(pre))):
        with torch.inference_mode(False):
            (grad,) = torch.autograd.grad(output, pre[layer], grad_outputs=grad, retain_graph=layer > 0)
        grads.append(grad)
        output = pre[layer]
        yield
    return out.resid, out.logits.detach(), grads[::-1]


def _with_grad() -> contextlib.ExitStack:
    """Grad on, outside inference mode: the context of each slice of the forward gradients are taken through."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _cos(a: torch.Tensor, b: torch.Tensor, na: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
    """Cosine along the last dim, 0 where either vector is zero; na/nb are the precomputed norms."""
    return (a * b).sum(-1) / (na * nb).clamp_min(EPS)


class LayerStats(NamedTuple):
    """Per-layer figures of one prompt's residual stream, each indexed [layer] -> (T,) or a scalar."""

    norms: dict[str, torch.Tensor]  # RESID_NAMES -> (L, T) L2 norms
    update_ratio: dict[str, torch.Tensor]  # attn | mlp | block -> (L, T)
    cos_update: torch.Tensor  # (L,) mean over positions
    block_influence: torch.Tensor  # (L,) mean over positions


def _layer_stats(resid: list[dict[str, torch.Tensor]]) -> LayerStats:
    """Norms, update ratios, cos_update and block influence of every layer (row 0 of the batch)."""
    stack = torch.stack([torch.stack([r[name][0] for r in resid]) for name in RESID_NAMES])  # (5, L, T, C)
    stack = stack.detach().to(torch.promote_types(stack.dtype, torch.float32))
    norms = torch.linalg.vector_norm(stack, dim=-1)  # (5, L, T)
    pre, _, _, _, post = stack.unbind(0)  # each (L, T, C)
    n_pre, n_attn, n_mid, n_mlp, n_post = norms.unbind(0)  # each (L, T)
    update = post - pre  # (L, T, C)
    n_upd = torch.linalg.vector_norm(update, dim=-1)  # (L, T)
    return LayerStats(
        norms=dict(zip(RESID_NAMES, norms.unbind(0), strict=True)),
        update_ratio={
            "attn": n_attn / n_pre.clamp_min(EPS),
            "mlp": n_mlp / n_mid.clamp_min(EPS),
            "block": n_upd / n_pre.clamp_min(EPS),
        },
        cos_update=_cos(pre, update, n_pre, n_upd).mean(-1),
        block_influence=1.0 - _cos(pre, post, n_pre, n_post).mean(-1),
    )


def _logit_lens(
    model: Transformer,
    resid: list[dict[str, torch.Tensor]],
    logits: torch.Tensor,
    k: int,
    tuned: TunedLens | None = None,
) -> list[dict[str, Any]]:
    """Per layer at the last position: top-k tokens of ln_f(resid_post) unembedded, entropy, KL(final || layer);
    with `tuned`, of ln_f(tuned.apply(layer, resid_post)) (the tuned lens)."""
    last = torch.stack([r["resid_post"][0, -1] for r in resid]).detach()  # (L, C)
    if tuned is not None:
        last = tuned.apply_all(last.to(tuned.weight.dtype)).to(last.dtype)
    logq = F.log_softmax(model.unembed(model.ln_f(last)).float(), dim=-1)  # (L, V)
    logp = F.log_softmax(logits[0, -1].float(), dim=-1)  # (V,)
    q = logq.exp()  # (L, V)
    entropy = -(q * logq).sum(-1)  # (L,)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)  # (L,)
    top_p, top_i = q.topk(k, dim=-1)  # (L, k)
    packed = torch.stack([entropy, kl], dim=1).tolist()  # (L, 2)
    top_p_l, top_i_l = top_p.tolist(), top_i.tolist()
    return [
        {
            "top": [
                {"id": i, "text": _token_text(i), "prob": p}
                for i, p in zip(top_i_l[layer], top_p_l[layer], strict=True)
            ],
            "entropy": packed[layer][0],
            "kl_to_final": packed[layer][1],
        }
        for layer in range(len(resid))
    ]


def _summary(
    layers: list[dict[str, Any]], n_layer: int, *, with_ablation: bool, ablation_asked: bool
) -> dict[str, Any]:
    first_pre = layers[0]["resid_pre"]["mean"]
    last_post = layers[-1]["resid_post"]["mean"]
    growth = (last_post / max(first_pre, EPS)) ** (1.0 / n_layer)
    blocks = [e["update_ratio"]["block"] for e in layers]
    summary: dict[str, Any] = {
        "norm_growth_per_layer": growth,
        "largest_update_layer": max(range(n_layer), key=blocks.__getitem__),
    }
    if ablation_asked:
        rho = None
        if with_ablation:
            rho = spearman([e["block_influence"] for e in layers], [e["delta_loss"]["block"] for e in layers])
        summary["spearman_bi_vs_delta_loss"] = rho
    return summary


def _average_ranks(xs: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and xs[order[stop + 1]] == xs[order[start]]:
            stop += 1
        for k in range(start, stop + 1):
            ranks[order[k]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def _token_text(token_id: int) -> str:
    try:
        return token_text(token_id)
    except ValueError:  # a vocabulary wider than bytes
        return f"<{token_id}>"


def _clean(obj: Any) -> Any:
    """Round floats to SIG_DIGITS significant digits, non-finite to None, recursively."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            log.warning("non-finite diagnostic value replaced by None")
            return None
        return float(f"{obj:.{SIG_DIGITS}g}")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _fmt(x: float | None, digits: int = 4) -> str:
    """Short number: `digits` significant digits, '-' for None."""
    return "-" if x is None else f"{x:.{digits}g}"


def _cell(value: float | str | None, width: int) -> str:
    """Right-aligned table cell; numbers lose digits until they fit."""
    if isinstance(value, str):
        return f"{_clip(value, width):>{width}}"
    text = _fmt(value)
    for digits in (3, 2, 1):
        if len(text) <= width:
            break
        text = _fmt(value, digits)
    return f"{_clip(text, width):>{width}}"


def _top1(lens: dict[str, Any]) -> str:
    return _clip(repr(lens["top"][0]["text"]), 6) if lens and lens["top"] else "-"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _bar(value: float, top: float, width: int) -> str:
    """A horizontal bar of `width` cells for value/top, in eighths of a cell."""
    eighths = round(8 * width * value / top) if top > 0 else 0
    eighths = min(max(eighths, 0), 8 * width)
    full, rest = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[rest] if rest else "")
