"""Reading the residual stream out: hidden-state export and activation patching, each a job for `Engine.run_job`.

- `hidden_states`: the activations at chosen sites (TransformerLens names, `RESID_NAMES`), layers and positions of
  each prompt, from the reference forward with the request's intervention, run a block at a time
  (`Transformer.forward_steps`): a yield after each block, and after each layer's copies. `to_safetensors` writes
  them as a safetensors file named like TransformerLens's cache (`blocks.{layer}.hook_{site}`), with the token ids
  in its metadata.
- `patching`: activation patching (ROME's causal tracing, TransformerLens's `patching.py`): the corrupt prompt run
  with one activation (site, layer, position) replaced by the clean run's, for every cell of the grid, the metric
  measured after the last position. The patched runs are batched, many grid cells (rows) per forward, through the
  stream-edit seam (`model.edits.StreamPatch`, applied in `model.edits.apply` / `replace`); every forward run a
  block at a time, a yield after each block.
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save

from model.edits import SITES, Intervention, StreamPatch
from model.transformer import RESID_NAMES, Transformer, in_slices

PATCH_SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "resid_post")
METRICS: tuple[str, ...] = ("logprob", "logit_diff")
Metric = Literal["logprob", "logit_diff"]
PATCH_TOKENS_PER_FORWARD = 256  # grid rows x prompt tokens in one patched forward (a job slice: one block of it)
SAFETENSORS_FORMAT = "shortcut-hidden-states/1"


def hook_name(layer: int, site: str) -> str:
    """TransformerLens's name of an activation: `blocks.3.hook_resid_post`."""
    return f"blocks.{layer}.hook_{site}"


def resolve_positions(
    positions: Literal["all", "last"] | Sequence[int], n_tokens: int, where: str = "positions"
) -> list[int]:
    """The positions ("all", "last", or indices, negative from the end as in Python) of a prompt of `n_tokens` tokens,
    as indices 0..n_tokens-1; ValueError naming the entry out of range."""
    if positions == "all":
        return list(range(n_tokens))
    if positions == "last":
        return [n_tokens - 1]
    out = []
    for i, p in enumerate(positions):
        if not -n_tokens <= p < n_tokens:
            raise ValueError(f"{where}[{i}] is {p}; a prompt of {n_tokens} tokens has positions 0..{n_tokens - 1}")
        out.append(p % n_tokens)
    return out


def export_floats(n_positions: Sequence[int], n_layers: int, n_sites: int, d_model: int) -> int:
    """How many numbers an export holds: per prompt, layers x sites x its positions x d_model."""
    return sum(n_positions) * n_layers * n_sites * d_model


def _check_ids(model: Transformer, ids: Sequence[int], where: str) -> None:
    window, vocab = model.config.block_size, model.config.vocab_size
    if not 1 <= len(ids) <= window:
        raise ValueError(f"{where} is {len(ids)} tokens; it needs 1..{window}")
    if any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"{where} has a token id outside 0..{vocab - 1}")


def hidden_states(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    layers: Sequence[int],
    sites: Sequence[str],
    positions: Sequence[Sequence[int]],
    intervention: Intervention | None = None,
) -> Generator[None, None, list[torch.Tensor]]:
    """Per prompt, the activations (layers, sites, positions, d_model) float32 on the CPU, in the order asked, from
    the reference forward with `intervention` (compiled as `/diagnostics` does: every position is the prompt's).
    A generator for `Engine.run_job`: per prompt, a yield after each block of its forward and after each layer's
    copies (n_layer + len(layers) slices), no inference context held across a yield."""
    config = model.config
    for layer in layers:
        if not 0 <= layer < config.n_layer:
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{config.n_layer - 1}")
    for site in sites:
        if site not in RESID_NAMES:
            raise ValueError(f"site {site!r} is not one of {', '.join(RESID_NAMES)}")
    if len(positions) != len(prompts):
        raise ValueError("positions needs one list per prompt")
    device = next(model.parameters()).device
    out = []
    for i, (ids, pos) in enumerate(zip(prompts, positions, strict=True)):
        _check_ids(model, ids, f"prompts[{i}]")
        edits = intervention.compile(config.n_layer, device, n_prompt=len(ids)) if intervention else None
        idx = torch.tensor([list(ids)], device=device)  # (1, T)
        res = yield from in_slices(model.forward_steps(idx, return_resid=True, edits=edits), torch.inference_mode)
        assert res.resid is not None
        arr = torch.empty(len(layers), len(sites), len(pos), config.d_model)  # float32 on the CPU
        at = torch.tensor(list(pos), dtype=torch.long, device=device)
        for li, layer in enumerate(layers):  # the copies a layer at a time too: a whole export's is a block's worth
            with torch.inference_mode():
                for si, site in enumerate(sites):
                    arr[li, si] = res.resid[layer][site][0, at]  # (P, C)
            yield
        out.append(arr)
    return out


def to_safetensors(
    arrays: Sequence[torch.Tensor], layers: Sequence[int], sites: Sequence[str], metadata: dict[str, Any]
) -> bytes:
    """A safetensors file of per-prompt arrays (layers, sites, P, d_model), every prompt with the same P: one tensor
    per (site, layer) of shape (prompts, P, d_model), named like TransformerLens (`blocks.{layer}.hook_{site}`).
    `metadata` values that are not strings are written as JSON."""
    if len({a.shape[2] for a in arrays}) > 1:
        raise ValueError("a safetensors export needs the same number of positions in every prompt")
    batch = torch.stack(list(arrays))  # (prompts, layers, sites, P, C)
    tensors = {
        hook_name(layer, site): batch[:, li, si].contiguous()
        for li, layer in enumerate(layers)
        for si, site in enumerate(sites)
    }
    meta = {"format": SAFETENSORS_FORMAT}
    meta.update({k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in metadata.items()})
    return save(tensors, metadata=meta)


# --- activation patching ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchingResult:
    """What `patching` measured. `raw[site][layer][position]`: the metric of the corrupt run with that activation
    patched from the clean run; `effect` the same normalized, (patched - corrupt) / (clean - corrupt), None when
    clean and corrupt measure the same (nothing to restore)."""

    target: int
    clean_metric: float
    corrupt_metric: float
    raw: dict[str, list[list[float]]]
    effect: dict[str, list[list[float]]] | None
    forwards: int  # forward passes run, the clean and corrupt ones included


def measure(logits: torch.Tensor, metric: str, target: int, contrast: int | None) -> torch.Tensor:
    """The metric of last-position logits (n, V) as float64 (n,): the target's log-probability, or its logit minus
    the contrast's."""
    x = logits.double()
    if metric == "logprob":
        return F.log_softmax(x, dim=-1)[:, target]
    if contrast is None:
        raise ValueError("metric logit_diff needs a contrast token")
    return x[:, target] - x[:, contrast]


def patching(
    model: Transformer,
    clean: Sequence[int],
    corrupt: Sequence[int],
    *,
    target: int | None = None,
    metric: str = "logprob",
    contrast: int | None = None,
    sites: Sequence[str] = ("resid_pre",),
    intervention: Intervention | None = None,
    tokens_per_forward: int = PATCH_TOKENS_PER_FORWARD,
) -> Generator[None, None, PatchingResult]:
    """Activation patching of every (site, layer, position): the corrupt prompt with that activation replaced by the
    clean run's, the metric measured after the last position. `target` None: the clean run's greedy next token.
    Both runs, and every patched one, carry `intervention`. A generator for `Engine.run_job`: the clean and corrupt
    runs, then the grid in forwards of up to `tokens_per_forward` tokens (rows x prompt length), each forward a block
    at a time (`Transformer.forward_steps`), a yield after each block and after each forward's measurement."""
    config = model.config
    _check_ids(model, clean, "clean")
    _check_ids(model, corrupt, "corrupt")
    if len(clean) != len(corrupt):
        raise ValueError(f"clean is {len(clean)} tokens and corrupt is {len(corrupt)}; they need the same number")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}")
    for site in sites:
        if site not in PATCH_SITES:
            raise ValueError(f"site {site!r} is not one of {', '.join(PATCH_SITES)}")
    for name, tok in (("target", target), ("contrast", contrast)):
        if tok is not None and not 0 <= tok < config.vocab_size:
            raise ValueError(f"{name} {tok} is not a token id (0..{config.vocab_size - 1})")
    if metric == "logit_diff" and contrast is None:
        raise ValueError("metric logit_diff needs a contrast token")
    device = next(model.parameters()).device
    T, L = len(clean), config.n_layer
    edits = intervention.compile(L, device, n_prompt=T) if intervention else None
    steps = model.forward_steps(
        torch.tensor([list(clean), list(corrupt)], device=device),
        return_resid=True,
        edits=edits.expand(2) if edits is not None else None,
    )
    both = yield from in_slices(steps, torch.inference_mode)
    assert both.resid is not None
    with torch.inference_mode():
        last = both.logits[:, -1]  # (2, V)
        if target is None:
            target = int(last[0].argmax())
        base = measure(last, metric, target, contrast)  # (2,)
        clean_metric, corrupt_metric = float(base[0]), float(base[1])
        clean_acts = {site: torch.stack([r[site][0] for r in both.resid]) for site in sites}  # each (L, T, C)
    yield
    cells = [(s, layer, p) for s in range(len(sites)) for layer in range(L) for p in range(T)]
    per_forward = max(1, tokens_per_forward // T)
    idx_row = torch.tensor([list(corrupt)], device=device)
    values = torch.empty(len(cells), dtype=torch.float64)
    forwards = 1
    for start in range(0, len(cells), per_forward):
        chunk = cells[start : start + per_forward]
        n = len(chunk)
        with torch.inference_mode():
            layer_t = torch.tensor([c[1] for c in chunk], device=device)
            pos_t = torch.tensor([c[2] for c in chunk], device=device)
            site_t = torch.tensor([SITES.index(sites[c[0]]) for c in chunk], device=device)
            value = torch.stack([clean_acts[sites[s]][layer, p] for s, layer, p in chunk])  # (n, C)
            patch = StreamPatch(layer_t, site_t, pos_t, value)
        steps = model.forward_steps(
            idx_row.expand(n, -1),
            edits=edits.expand(n) if edits is not None else None,
            patch=patch,
            last_only=True,
        )
        out = yield from in_slices(steps, torch.inference_mode)
        with torch.inference_mode():
            values[start : start + n] = measure(out.logits[:, -1], metric, target, contrast).cpu()
        forwards += 1
        yield
    grid = values.view(len(sites), L, T)
    denom = clean_metric - corrupt_metric
    raw = {site: grid[i].tolist() for i, site in enumerate(sites)}
    effect = None
    if denom != 0 and math.isfinite(denom):
        effect = {site: ((grid[i] - corrupt_metric) / denom).tolist() for i, site in enumerate(sites)}
    return PatchingResult(target, clean_metric, corrupt_metric, raw, effect, forwards)
