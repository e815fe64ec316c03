"""What a request does to the residual stream: one value, compiled once, applied in one place per path.

- `Intervention` is the request's spec as the API takes it (skip or scale parts of blocks): validated against a
  model (`problem`), echoed (`to_dict`), counted (`parts`, `layers`).
- `StreamEdits` is that spec compiled for a model (`Intervention.compile`), with a leading row dimension: a
  request's edits have one row, a batch's one row per sequence (`StreamEdits.stack`). The engine, the steps and
  diagnostics pass it along without looking inside.
- `apply` is where a part's update meets the stream: the one place the reference forward
  (`model.transformer.Block`) and the TorchScript step (`model.decode`) apply edits. The fused C step applies the
  same maths in `edit_update` (model/fast/fused_step.c), fed by the `StreamEdits` fields through its header's
  `ShortcutEdits` struct.

Kinds of edit: skip and scale (gates on a part's update) and add (a steering vector added to the stream after a
block, `VectorAdd`). To add another: a field on `Intervention` with its check in `problem`, a tensor on
`StreamEdits` filled by `compile` and handled by `stack` / `expand` / `combine` / `check` / `to`, its effect in
`apply`, and the same in C (`ShortcutEdits` and `edit_update`, mirrored in model/fast/abi.py).

Activation patching (`StreamPatch`: one activation per row replaced by a given vector) is a separate, optional value
that only the reference forward takes (`Transformer.forward(patch=)`, for `model.readout`), not a field of
`StreamEdits`: the decode steps (TorchScript, the fused C step) never receive it, so they need not refuse it.
`replace` is the one place a patch acts; `apply` calls it for a part's write and the stream after it, and `Block`
once more for resid_pre, before the block reads its input.

No `from __future__ import annotations` here: TorchScript reads `StreamEdits`'s annotations as types.
"""

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
from torch import Tensor

Component = Literal["block", "attn", "mlp"]
PARTS: tuple[Component, ...] = ("block", "attn", "mlp")
PART_COLUMNS: dict[str, list[int]] = {"block": [0, 1], "attn": [0], "mlp": [1]}  # a part's columns of the gates
ATTN_PART, MLP_PART = 0, 1  # the two parts of a block, in the order they write
MAX_FACTOR = 100.0
Positions = Literal["all", "prompt", "generated"]
POSITIONS: tuple[Positions, ...] = ("all", "prompt", "generated")
MAX_COEFF = 1000.0  # |coeff| of an added vector; far past where text degenerates (docs/steering.md)
KINDS: tuple[str, ...] = (*PARTS, "add")  # what `Intervention.parts` counts (a fixed metric label set)
ALL_PROMPT = 2**62  # n_prompt when every position is the prompt's
SITES: tuple[str, ...] = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")  # a patch's site codes
RESID_PRE, ATTN_OUT, RESID_MID, MLP_OUT, RESID_POST = 0, 1, 2, 3, 4


class StreamEdits(NamedTuple):
    """A compiled change to the residual stream, per row (sequence).

    `gates` (B, n_layer, 2): the factor on each layer's attention and MLP update (1: unchanged, 0: skipped, the
    identity); None when no row changes anything there.
    `add` (B, n_layer, 2, C): what is added to the stream after block l (its resid_post), at the row's prompt
    positions ([:, l, 0]) and at its generated ones ([:, l, 1]); with `n_prompt` (B,) int64: position p of row b is
    generated when p >= n_prompt[b]. Both None when no row adds anything.
    """

    gates: Optional[Tensor]  # noqa: UP045 - TorchScript reads this annotation
    add: Optional[Tensor] = None  # noqa: UP045
    n_prompt: Optional[Tensor] = None  # noqa: UP045

    @staticmethod
    def stack(edits: Sequence[Optional["StreamEdits"]]) -> Optional["StreamEdits"]:  # noqa: UP045
        """One row per entry, in order (a row without edits gets the identity: factors 1, nothing added); None when
        no entry has any."""
        with_gates = [e.gates for e in edits if e is not None and e.gates is not None]
        with_add = [e for e in edits if e is not None and e.add is not None]
        if not with_gates and not with_add:
            return None
        gates = add = n_prompt = None
        if with_gates:
            one = torch.ones_like(with_gates[0][:1])
            gates = torch.cat([e.gates if e is not None and e.gates is not None else one for e in edits])
        if with_add:
            zero = torch.zeros_like(with_add[0].add[:1])  # type: ignore[index]
            none = torch.zeros_like(with_add[0].n_prompt[:1])  # type: ignore[index]
            add = torch.cat([e.add if e is not None and e.add is not None else zero for e in edits])
            n_prompt = torch.cat([e.n_prompt if e is not None and e.n_prompt is not None else none for e in edits])
        return StreamEdits(gates, add, n_prompt)

    def expand(self, n: int) -> "StreamEdits":
        """This one row's edits for `n` rows (the positions of one prompt, run as rows)."""
        return StreamEdits(
            self.gates.expand(n, -1, -1) if self.gates is not None else None,
            self.add.expand(n, -1, -1, -1) if self.add is not None else None,
            self.n_prompt.expand(n) if self.n_prompt is not None else None,
        )

    def combine(self, other: Optional["StreamEdits"]) -> "StreamEdits":  # noqa: UP045
        """Both edits at once (factors on the same part multiply, added vectors sum; both of the same rows, so of
        the same prompt lengths where both add)."""
        if other is None:
            return self
        gates = self.gates
        if gates is None or other.gates is None:
            gates = gates if gates is not None else other.gates
        else:
            gates = gates * other.gates
        add, n_prompt = self.add, self.n_prompt
        if add is None or other.add is None:
            add, n_prompt = (add, n_prompt) if add is not None else (other.add, other.n_prompt)
        else:
            if not torch.equal(self.n_prompt, other.n_prompt):  # type: ignore[arg-type]
                raise ValueError("combined stream edits must have the same prompt lengths")
            add = add + other.add
        return StreamEdits(gates, add, n_prompt)

    def check(self, n_rows: int, n_layer: int, d_model: int | None = None) -> None:
        """Raise ValueError unless these are edits of `n_rows` rows for a model of `n_layer` layers (and, given,
        `d_model` wide)."""
        if self.gates is not None and self.gates.shape != (n_rows, n_layer, 2):
            raise ValueError(f"stream edits' gates must have shape ({n_rows}, {n_layer}, 2)")
        if (self.add is None) != (self.n_prompt is None):
            raise ValueError("stream edits' add and n_prompt come together")
        if self.add is not None and self.n_prompt is not None:
            C = self.add.shape[-1] if d_model is None else d_model
            if self.add.shape != (n_rows, n_layer, 2, C) or self.add.dtype != torch.float32:
                raise ValueError(f"stream edits' add must be float32 of shape ({n_rows}, {n_layer}, 2, {C})")
            if self.n_prompt.shape != (n_rows,) or self.n_prompt.dtype != torch.int64:
                raise ValueError(f"stream edits' n_prompt must be int64 of shape ({n_rows},)")

    def to(self, device: torch.device | str) -> "StreamEdits":
        """The same edits on `device`."""
        return StreamEdits(*(t.to(device) if t is not None else None for t in self))


class StreamPatch(NamedTuple):
    """Activation patching, one patch per row: row b's activation at site `site[b]` (a code into `SITES`) of layer
    `layer[b]`, at position `pos[b]`, is replaced by `value[b]` (B, C). A row with layer -1 is not patched (a
    baseline row). Only the reference forward takes it (`Transformer.forward(patch=)`)."""

    layer: Tensor  # (B,) int64
    site: Tensor  # (B,) int64
    pos: Tensor  # (B,) int64
    value: Tensor  # (B, C), the stream's dtype

    def check(self, n_rows: int, n_layer: int, d_model: int) -> None:
        """Raise ValueError unless this patches `n_rows` rows of a model of `n_layer` layers, `d_model` wide."""
        for name in ("layer", "site", "pos"):
            t = getattr(self, name)
            if t.shape != (n_rows,) or t.dtype != torch.int64:
                raise ValueError(f"a patch's {name} must be int64 of shape ({n_rows},)")
        if self.value.shape != (n_rows, d_model):
            raise ValueError(f"a patch's value must have shape ({n_rows}, {d_model})")
        if bool(((self.layer < -1) | (self.layer >= n_layer)).any()):
            raise ValueError(f"a patch's layer must be -1 (none) or in 0..{n_layer - 1}")
        if bool(((self.site < 0) | (self.site >= len(SITES))).any()):
            raise ValueError(f"a patch's site must be a code 0..{len(SITES) - 1} ({', '.join(SITES)})")


def replace(patch: Optional[StreamPatch], layer: int, site: int, t: Tensor, pos: Tensor) -> Tensor:  # noqa: UP045
    """`t` (B, T, C) or (B, C), the activation at `site` of block `layer`, with each row's patch put in where it
    names this layer, this site and the row's position (`pos` (B, T) or (B,))."""
    if patch is None:
        return t
    rows = (patch.layer == layer) & (patch.site == site)  # (B,)
    if pos.dim() == 1:
        hit = rows & (pos == patch.pos)  # (B,)
        return torch.where(hit[:, None], patch.value.to(t.dtype), t)
    hit = rows[:, None] & (pos == patch.pos[:, None])  # (B, T)
    return torch.where(hit[:, :, None], patch.value.to(t.dtype)[:, None, :], t)


def apply(
    edits: Optional[StreamEdits],  # noqa: UP045 - TorchScript
    layer: int,
    part: int,
    x: Tensor,
    f: Tensor,
    residual: bool,
    pos: Tensor,
    patch: Optional[StreamPatch] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor]:
    """(what the part writes, the stream after it) for the stream `x` before part `part` (ATTN_PART, MLP_PART) of block
    `layer` and that part's F(x) `f`, both (B, C) or (B, T, C); `pos` (B,) or (B, T): each token's position.

    x + g*F(x), or g*F(x) in a plain stack (no shortcut), where a skipped part (g = 0) leaves x as it is. After the
    MLP part (the block's resid_post), the row's added vector for prompt or generated positions, skipped block or
    not. With `patch` (the reference forward only), a patched part's write (attn_out, mlp_out) replaces what it
    computed before the stream adds it, and a patched stream after it (resid_mid, resid_post) replaces the sum."""
    if edits is None:
        f = replace(patch, layer, 1 + 2 * part, f, pos)  # part 0 writes attn_out (code 1), part 1 mlp_out (3)
        out = x + f if residual else f
        return f, replace(patch, layer, 2 + 2 * part, out, pos)  # the stream after: resid_mid (2), resid_post (4)
    gates = edits.gates
    if gates is not None:
        g = gates[:, layer, part]  # (B,)
        g = g.view([g.shape[0]] + [1] * (x.dim() - 1))  # (B, 1) or (B, 1, 1)
        f = replace(patch, layer, 1 + 2 * part, g * f, pos)
        out = x + f if residual else torch.where(g == 0, x, f)
    else:
        f = replace(patch, layer, 1 + 2 * part, f, pos)
        out = x + f if residual else f
    add, n_prompt = edits.add, edits.n_prompt
    if part == 1 and add is not None and n_prompt is not None:  # 1: MLP_PART (TorchScript reads no globals)
        a = add[:, layer]  # (B, 2, C)
        if pos.dim() == 1:
            out = out + torch.where((pos >= n_prompt)[:, None], a[:, 1], a[:, 0])  # (B, C)
        else:
            generated = (pos >= n_prompt[:, None])[:, :, None]  # (B, T, 1)
            out = out + torch.where(generated, a[:, 1, None], a[:, 0, None])  # (B, T, C)
    return f, replace(patch, layer, 2 + 2 * part, out, pos)


@dataclass(frozen=True)
class VectorAdd:
    """`coeff * vector` added to the residual stream after block `layer` (its resid_post) at `positions`: the
    prompt's, the generated ones or all. `vector`: d_model floats (float32 values); `name`: the stored vector's name
    when it was given by name (echoed instead of the floats)."""

    layer: int
    vector: tuple[float, ...]
    coeff: float = 1.0
    positions: str = "all"
    name: str | None = None

    @staticmethod
    def of(
        layer: int,
        vector: Tensor | Sequence[float],
        coeff: float = 1.0,
        positions: str = "all",
        name: str | None = None,
    ) -> "VectorAdd":
        """From a tensor or floats (kept as their float32 values)."""
        t = torch.as_tensor(vector, dtype=torch.float32).detach().cpu().reshape(-1)
        return VectorAdd(layer, tuple(t.tolist()), float(coeff), positions, name)

    def tensor(self) -> Tensor:
        """The vector, float32 (d_model,)."""
        return torch.tensor(self.vector, dtype=torch.float32)

    @property
    def norm(self) -> float:
        """The vector's L2 norm (before `coeff`)."""
        return math.sqrt(math.fsum(v * v for v in self.vector))

    @property
    def digest(self) -> str:
        """A short sha256 of the vector's float32 bytes (little-endian): names an inline vector in the echo."""
        return hashlib.sha256(self.tensor().numpy().astype("<f4").tobytes()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """How the echo and logs name the vector: its name, or "inline" with its norm and short hash."""
        return self.name if self.name is not None else f"inline(norm={self.norm:.4g}, sha256={self.digest})"

    def to_dict(self) -> dict[str, object]:
        """The echo: a named vector by name, an inline one by its norm and short hash, never the floats."""
        which: dict[str, object] = (
            {"name": self.name} if self.name is not None else {"vector": {"norm": self.norm, "sha256": self.digest}}
        )
        return {"layer": self.layer, **which, "coeff": self.coeff, "positions": self.positions}


@dataclass(frozen=True)
class Intervention:
    """A request's change to the residual stream: skip (F(x) not added: the identity) or scale parts of blocks, and
    add vectors to the stream after blocks (steering).

    `skip` holds (layer, part) pairs and `scale` (layer, part, factor) triples, part in block | attn | mlp.
    A block entry acts on both of its parts; factors on the same part multiply. `add` holds `VectorAdd`s; vectors
    added after the same block sum.
    """

    skip: tuple[tuple[int, str], ...] = ()
    scale: tuple[tuple[int, str, float], ...] = ()
    add: tuple[VectorAdd, ...] = ()

    def problem(self, n_layer: int, d_model: int | None = None) -> tuple[str, str] | None:
        """(field, message) of the first entry a model of `n_layer` layers (and, given, `d_model` wide) cannot
        apply, or None. Without `d_model` an added vector's length is checked by `compile` (a ValueError)."""
        seen: set[tuple[int, str]] = set()
        entries = [("skip", i, e[0], e[1], 0.0) for i, e in enumerate(self.skip)]
        entries += [("scale", i, e[0], e[1], e[2]) for i, e in enumerate(self.scale)]
        for kind, i, layer, part, factor in entries:
            where = f"intervention.{kind}[{i}]"
            if not 0 <= layer < n_layer:
                return f"{where}.layer", f"{where}.layer is {layer}; the model has layers 0..{n_layer - 1}"
            if part not in PARTS:
                return f"{where}.part", f"{where}.part is {part!r}; use one of {', '.join(PARTS)}"
            if not (math.isfinite(factor) and abs(factor) <= MAX_FACTOR):
                return f"{where}.factor", f"{where}.factor must be finite with |factor| <= {MAX_FACTOR:g}"
            if (layer, part) in seen:
                return where, f"{where} repeats layer {layer} part {part!r}"
            seen.add((layer, part))
        for i, a in enumerate(self.add):
            where = f"intervention.add[{i}]"
            if not 0 <= a.layer < n_layer:
                return f"{where}.layer", f"{where}.layer is {a.layer}; the model has layers 0..{n_layer - 1}"
            if d_model is not None and len(a.vector) != d_model:
                return (
                    f"{where}.vector",
                    f"{where}.vector has {len(a.vector)} numbers; the model's d_model is {d_model}",
                )
            if not all(math.isfinite(v) for v in a.vector):
                return f"{where}.vector", f"{where}.vector must be finite (as float32)"
            if not (math.isfinite(a.coeff) and abs(a.coeff) <= MAX_COEFF):
                return f"{where}.coeff", f"{where}.coeff must be finite with |coeff| <= {MAX_COEFF:g}"
            if a.positions not in POSITIONS:
                return f"{where}.positions", f"{where}.positions is {a.positions!r}; use one of {', '.join(POSITIONS)}"
        return None

    def compile(self, n_layer: int, device: torch.device | str = "cpu", *, n_prompt: int | None = None) -> StreamEdits:
        """The edits of one row (a model of `n_layer` layers; check `problem` first). `n_prompt`: the request's
        prompt length (its generated tokens sit at positions n_prompt and up), for kinds of edit that act on the
        prompt's or the generated positions only; None when every position is the prompt's (diagnostics). Skip and
        scale act on every position; added vectors where their `positions` say. An intervention that only adds has
        no gates (a step skips their multiply)."""
        gates = None
        if self.skip or self.scale or not self.add:
            g = torch.ones(n_layer, 2)
            for layer, part, factor in [(l, p, 0.0) for l, p in self.skip] + list(self.scale):
                g[layer, PART_COLUMNS[part]] *= factor
            gates = g[None].to(device)  # (1, n_layer, 2)
        if not self.add:
            return StreamEdits(gates)
        C = len(self.add[0].vector)
        add = torch.zeros(n_layer, 2, C)
        for a in self.add:
            if len(a.vector) != C:
                raise ValueError("added vectors must all have d_model numbers")
            v = a.coeff * a.tensor()  # (C,) float32
            for column in {"prompt": (0,), "generated": (1,), "all": (0, 1)}[a.positions]:
                add[a.layer, column] += v
        n = torch.tensor([ALL_PROMPT if n_prompt is None else n_prompt], dtype=torch.int64)
        return StreamEdits(gates, add[None].to(device), n.to(device))  # (1, n_layer, 2, C), (1,)

    def to_dict(self) -> dict[str, list[dict[str, object]]]:
        """The JSON form the API takes and echoes (`add` only when there are added vectors, each by name or by its
        norm and short hash)."""
        out: dict[str, list[dict[str, object]]] = {
            "skip": [{"layer": l, "part": p} for l, p in self.skip],
            "scale": [{"layer": l, "part": p, "factor": f} for l, p, f in self.scale],
        }
        if self.add:
            out["add"] = [a.to_dict() for a in self.add]
        return out

    def parts(self) -> set[str]:
        """What this intervention touches, for counting: parts (block, attn, mlp), and "add" when it adds vectors
        (`KINDS`)."""
        return {p for _, p in self.skip} | {p for _, p, _ in self.scale} | ({"add"} if self.add else set())

    def layers(self) -> set[int]:
        """The layers this intervention touches (an added vector: the block it follows)."""
        return {entry[0] for entry in self.skip + self.scale} | {a.layer for a in self.add}
