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

To add a kind of edit (say, a vector added after a block): a field on `Intervention` with its check in `problem`,
a tensor on `StreamEdits` filled by `compile` and handled by `stack` / `expand` / `combine`, its effect in `apply`,
and the same in C (`ShortcutEdits` and `edit_update`, mirrored in model/fast/abi.py).

No `from __future__ import annotations` here: TorchScript reads `StreamEdits`'s annotations as types.
"""

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


class StreamEdits(NamedTuple):
    """A compiled change to the residual stream, per row (sequence).

    `gates` (B, n_layer, 2): the factor on each layer's attention and MLP update (1: unchanged, 0: skipped, the
    identity); None when no row changes anything there.
    """

    gates: Optional[Tensor]  # noqa: UP045 - TorchScript reads this annotation

    @staticmethod
    def stack(edits: Sequence[Optional["StreamEdits"]]) -> Optional["StreamEdits"]:  # noqa: UP045
        """One row per entry, in order (a row without edits gets the identity); None when no entry has any."""
        some = [e for e in edits if e is not None and e.gates is not None]
        if not some:
            return None
        identity = torch.ones_like(some[0].gates[:1])  # type: ignore[index]
        return StreamEdits(torch.cat([e.gates if e is not None and e.gates is not None else identity for e in edits]))

    def expand(self, n: int) -> "StreamEdits":
        """This one row's edits for `n` rows (the positions of one prompt, run as rows)."""
        return StreamEdits(self.gates.expand(n, -1, -1) if self.gates is not None else None)

    def combine(self, other: Optional["StreamEdits"]) -> "StreamEdits":  # noqa: UP045
        """Both edits at once (factors on the same part multiply)."""
        if other is None or other.gates is None:
            return self
        if self.gates is None:
            return other
        return StreamEdits(self.gates * other.gates)

    def check(self, n_rows: int, n_layer: int) -> None:
        """Raise ValueError unless these are edits of `n_rows` rows for a model of `n_layer` layers."""
        if self.gates is not None and self.gates.shape != (n_rows, n_layer, 2):
            raise ValueError(f"stream edits' gates must have shape ({n_rows}, {n_layer}, 2)")

    def to(self, device: torch.device | str) -> "StreamEdits":
        """The same edits on `device`."""
        return StreamEdits(self.gates.to(device) if self.gates is not None else None)


def apply(
    edits: Optional[StreamEdits],  # noqa: UP045 - TorchScript
    layer: int,
    part: int,
    x: Tensor,
    f: Tensor,
    residual: bool,
    pos: Tensor,
) -> tuple[Tensor, Tensor]:
    """(what the part writes, the stream after it) for the stream `x` before part `part` (ATTN_PART, MLP_PART) of block
    `layer` and that part's F(x) `f`, both (B, C) or (B, T, C); `pos` (B,) or (B, T): each token's position.

    x + g*F(x), or g*F(x) in a plain stack (no shortcut), where a skipped part (g = 0) leaves x as it is."""
    if edits is not None:
        gates = edits.gates
        if gates is not None:
            g = gates[:, layer, part]  # (B,)
            g = g.view([g.shape[0]] + [1] * (x.dim() - 1))  # (B, 1) or (B, 1, 1)
            f = g * f
            if not residual:
                return f, torch.where(g == 0, x, f)
    if residual:
        return f, x + f
    return f, f


@dataclass(frozen=True)
class Intervention:
    """A request's change to the residual stream: skip (F(x) not added: the identity) or scale parts of blocks.

    `skip` holds (layer, part) pairs and `scale` (layer, part, factor) triples, part in block | attn | mlp.
    A block entry acts on both of its parts; factors on the same part multiply.
    """

    skip: tuple[tuple[int, str], ...] = ()
    scale: tuple[tuple[int, str, float], ...] = ()

    def problem(self, n_layer: int) -> tuple[str, str] | None:
        """(field, message) of the first entry a model of `n_layer` layers cannot apply, or None."""
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
        return None

    def compile(self, n_layer: int, device: torch.device | str = "cpu", *, n_prompt: int | None = None) -> StreamEdits:
        """The edits of one row (a model of `n_layer` layers; check `problem` first). `n_prompt`: the request's
        prompt length (its generated tokens sit at positions n_prompt and up), for kinds of edit that act on the
        prompt's or the generated positions only; None when every position is the prompt's (diagnostics). Skip and
        scale act on every position."""
        g = torch.ones(n_layer, 2)
        for layer, part, factor in [(l, p, 0.0) for l, p in self.skip] + list(self.scale):
            g[layer, PART_COLUMNS[part]] *= factor
        return StreamEdits(g[None].to(device))  # (1, n_layer, 2)

    def to_dict(self) -> dict[str, list[dict[str, object]]]:
        """The JSON form the API takes and echoes."""
        return {
            "skip": [{"layer": l, "part": p} for l, p in self.skip],
            "scale": [{"layer": l, "part": p, "factor": f} for l, p, f in self.scale],
        }

    def parts(self) -> set[str]:
        """The parts this intervention touches (for counting)."""
        return {p for _, p in self.skip} | {p for _, p, _ in self.scale}

    def layers(self) -> set[int]:
        """The layers this intervention touches."""
        return {entry[0] for entry in self.skip + self.scale}
