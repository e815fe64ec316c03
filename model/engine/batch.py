"""What a batch of rows asks of each step beyond greedy decoding, worked out when its rows change (admission, leaving)
rather than every step. In the common case every field is empty: no edits, no trace, no controls, all greedy, no
logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.edits import StreamEdits
from model.engine.request import Request
from model.sampling import LogitControls


@dataclass(slots=True)
class SamplingBatch:
    """The rows' sampling settings as tensors (see `model.sampling.sample_rows`)."""

    temperature: torch.Tensor  # (B,), 0 = greedy
    top_k: torch.Tensor  # (B,), 0 = off
    top_p: torch.Tensor  # (B,)
    generators: list[torch.Generator | None]
    min_p: torch.Tensor | None  # (B,), None when no row uses it

    @staticmethod
    def of(batch: Sequence[Request], device: torch.device) -> SamplingBatch | None:
        """The batch's settings, or None when every row is greedy (nothing to draw)."""
        if all(r.params.temperature == 0 for r in batch):
            return None
        return SamplingBatch(
            temperature=torch.tensor([r.params.temperature for r in batch], device=device),
            top_k=torch.tensor([r.params.top_k for r in batch], device=device),
            top_p=torch.tensor([r.params.top_p for r in batch], device=device),
            generators=[r.generator for r in batch],
            min_p=torch.tensor([r.params.min_p for r in batch], device=device)
            if any(r.params.min_p > 0 for r in batch)
            else None,
        )


@dataclass(slots=True)
class BatchPlan:
    """What a step of these rows needs, in row order."""

    edits: StreamEdits | None  # one row per row of the batch, None when no row has edits
    traced: list[int]  # rows whose tokens carry a trace or their stream's vectors
    trace_rows: torch.Tensor | None  # the same as a tensor, None when no row is traced
    controls: list[LogitControls | None] | None  # per row, None when no row uses a logit control
    sampling: SamplingBatch | None  # None when every row is greedy
    n_logprobs: int  # the most logprobs any row asks for
    deadline: float  # the earliest deadline of the rows (inf: none has one)

    @staticmethod
    def of(batch: Sequence[Request], device: torch.device) -> BatchPlan:
        """The plan of `batch`."""
        traced = [i for i, r in enumerate(batch) if r.params.streamed]
        controls: list[LogitControls | None] | None = [r.controls for r in batch]
        if all(c is None for c in controls or ()):
            controls = None
        return BatchPlan(
            edits=StreamEdits.stack([r.edits for r in batch]),
            traced=traced,
            trace_rows=torch.tensor(traced, device=device) if traced else None,
            controls=controls,
            sampling=SamplingBatch.of(batch, device),
            n_logprobs=max((r.params.logprobs for r in batch), default=0),
            deadline=min((r.deadline for r in batch if r.deadline is not None), default=math.inf),
        )
