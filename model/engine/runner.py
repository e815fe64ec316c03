"""Runs the model for the engine: owns the decode step, the KV cache and the rows' next tokens and positions.

The rows' next tokens and positions live in preallocated tensors updated in place; the step's views of them and of
the cache are made once per batch size. What a request does to the stream reaches the step as the batch's
`StreamEdits`, passed through unopened.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from model import tokenizer
from model.decode import auto_decode_weights, float16_overflow
from model.diagnostics import stream_norms, stream_trace
from model.edits import Intervention
from model.engine.batch import BatchPlan
from model.engine.request import Request
from model.fast import FusedDecoder, auto_kv_dtype, make_decoder
from model.kv_cache import KVCache
from model.lens import TunedLens
from model.transformer import Transformer

log = logging.getLogger(__name__)

KV_CACHE_DTYPES = ("auto", "float32", "float16")
WARM_UP_PROMPT = tokenizer.encode("Warm up.")
WARM_UP_STEPS = 3  # decode steps of each kind: plain, then edited and traced
MIN_BLOCK_SIZE = len(WARM_UP_PROMPT) + 2 * WARM_UP_STEPS  # the positions a warm-up fills
Traces = list[dict[str, Any] | None]


class ModelRunner:
    """Prefills and decode steps of the running rows (row i of the cache is row i of the batch)."""

    def __init__(
        self,
        model: Transformer,
        max_batch_size: int,
        *,
        decode_weights: str = "auto",
        decode_backend: str = "auto",
        kv_cache_dtype: str = "auto",
        lens: TunedLens | None = None,
        decode_threads: int = 1,
    ) -> None:
        self.model = model
        self.lens = lens  # the tuned lens traces with lens="tuned" read through (the engine refuses them without)
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if self.config.block_size < MIN_BLOCK_SIZE:
            raise ValueError(
                f"block_size {self.config.block_size} is under {MIN_BLOCK_SIZE}, the positions the engine's warm-up "
                f"fills ({len(WARM_UP_PROMPT)} prompt tokens, {2 * WARM_UP_STEPS} decode steps)"
            )
        self.decode_weights = auto_decode_weights(self.device, model) if decode_weights == "auto" else decode_weights
        # (auto already chose float32 for such a model, with a warning: only an explicit float16 is checked here)
        over = float16_overflow(model) if decode_weights == "float16" else None
        if over is not None:
            raise ValueError(
                f"decode weights float16: {over[0]} holds {over[1]:.3g}, beyond float16's range; "
                "use SHORTCUT_DECODE_WEIGHTS=float32 (or auto)"
            )
        # the fast path (warm-up runs it too): the fused C step where it is built, else TorchScript (model/fast)
        self.decode_step = make_decoder(model, self.decode_weights, decode_backend, threads=decode_threads)
        self.decode_backend = "fused" if isinstance(self.decode_step, FusedDecoder) else "torchscript"
        self.kv_cache_dtype = self._kv_dtype(kv_cache_dtype)
        self.cache = KVCache(self.config, max_batch_size, device=self.device, dtype=self.kv_cache_dtype)
        self._tokens = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._views: dict[int, tuple[KVCache, torch.Tensor, torch.Tensor, KVCache]] = {}

    def _kv_dtype(self, name: str) -> torch.dtype:
        """The cache's dtype (`auto`: see `model.fast.auto_kv_dtype`); float16 or float32 needs the fused step unless
        it is the model's own dtype."""
        if name not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, not {name!r}")
        if name == "auto":
            return auto_kv_dtype(self.decode_step, self.dtype)
        dtype = getattr(torch, name)
        if dtype != self.dtype and self.decode_backend != "fused":
            raise ValueError(f"a {name} KV cache needs the fused decode step (this engine runs TorchScript)")
        return dtype

    def warm_up(self, rows: int, steps: int = WARM_UP_STEPS) -> None:
        """A prefill and a few decode steps (plain, then edited and traced), so first requests skip lazy
        initialisation (TorchScript specialises a step on its first calls)."""
        cache = self.cache.rows(0, rows)
        steps = min(steps, (self.config.block_size - len(WARM_UP_PROMPT)) // 2)  # all within the window
        prompt = torch.tensor([WARM_UP_PROMPT] * rows, device=self.device)  # (R, T)
        edits = Intervention().compile(self.config.n_layer, self.device).expand(rows)  # the identity, edited path
        with torch.inference_mode():
            self.model(prompt, cache=cache, pos=torch.zeros(rows, dtype=torch.long, device=self.device), last_only=True)
            pos = torch.full((rows,), prompt.shape[1], device=self.device)
            for step_edits, traced in ((None, None), (edits, torch.arange(rows, device=self.device))):
                for _ in range(steps):
                    self.decode_step(prompt[:, 0], cache, pos, step_edits, traced)  # (R, V)
                    pos = pos + 1

    def prefill(
        self, batch: Sequence[Request], row: int, plan: BatchPlan, want_norms: bool
    ) -> tuple[torch.Tensor, torch.Tensor, Traces | None, list[list[float]] | None]:
        """The prompts of `batch` into cache rows `row`.. : (logits (n, V) at each last prompt position, the slots of
        the rows' next tokens to sample into, the traces of the traced rows, per row |resid_post| of every layer if
        `want_norms`)."""
        return self._prefill(batch, [r.prompt for r in batch], row, 0, plan, want_norms)

    def prefill_chunk(
        self, req: Request, row: int, start: int, stop: int, plan: BatchPlan, want_norms: bool
    ) -> tuple[torch.Tensor, torch.Tensor, Traces | None, list[list[float]] | None]:
        """Prompt positions start..stop-1 of `req` into cache row `row`, which holds its positions before `start`
        (chunked prefill). What `prefill` returns for the one request, meaningful once `stop` is the prompt's end
        (the logits, trace and norms of its last position; the next token's slot and position set for that row)."""
        return self._prefill([req], [req.prompt[start:stop]], row, start, plan, want_norms)

    def _prefill(
        self,
        batch: Sequence[Request],
        prompts: list[list[int]],
        row: int,
        start: int,
        plan: BatchPlan,
        want_norms: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, Traces | None, list[list[float]] | None]:
        """`prompts` (the batch's prompts, or one chunk of one) at positions start.. into cache rows `row`.."""
        n = len(batch)
        last = all(start + len(p) == len(r.prompt) for r, p in zip(batch, prompts, strict=True))
        want_norms = want_norms and last  # (the trace and the norms are those of the last position)
        traced = plan.traced if last else []
        streams = want_norms or bool(traced)
        prefill = getattr(self.decode_step, "prefill", None)  # a step that prefills through its own kernels
        if prefill is not None:
            logits, stream = self._prefill_each(prefill, batch, prompts, row, start, streams)
        else:
            logits, stream = self._prefill_padded(prompts, row, start, streams, plan)
        norms = stream_norms(stream)[1:].T.tolist() if want_norms and stream is not None else None  # (L + 1, n, C)
        traces = None
        if traced and stream is not None:
            traces = self._traces(batch, plan, stream[:, traced], [len(r.prompt) - 1 for r in batch])
        if last:
            self._positions[row : row + n] = torch.tensor([len(r.prompt) for r in batch])  # where each next token goes
        return logits, self._tokens[row : row + n], traces, norms

    def _prefill_each(
        self, prefill: Any, batch: Sequence[Request], prompts: list[list[int]], row: int, start: int, streams: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each prompt through the step's own kernels (`FusedDecoder.prefill`): the numbers of the decode step (its
        weights and cache), no padding."""
        outs = [
            prefill(torch.tensor(p), self.cache.rows(row + i, row + i + 1), r.edits, trace=streams, start=start)
            for i, (r, p) in enumerate(zip(batch, prompts, strict=True))
        ]
        logits = torch.cat([o.logits for o in outs])  # (n, V)
        return logits, torch.cat([o.stream for o in outs], dim=1) if streams else None  # (L + 1, n, C)

    def _prefill_padded(
        self, prompts: list[list[int]], row: int, start: int, streams: bool, plan: BatchPlan
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompts through the reference forward in one batch, right-padded to the longest, at positions start..

        Padding is exact: a causal model's outputs at real positions never see later (padded) ones, and the
        cache entries written at padded positions are overwritten by the row's decode steps before any
        query can attend to them (the decode mask covers keys up to each row's own position)."""
        n, width = len(prompts), max(len(p) for p in prompts)
        idx = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)  # (n, T)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)  # (n,)
        out = self.model(
            idx,
            cache=self.cache.rows(row, row + n),
            pos=torch.full((n,), start, dtype=torch.long, device=self.device),
            return_resid=streams,
            at=last,
            edits=plan.edits,
        )
        stream = None
        if streams:
            assert out.resid is not None
            stream = torch.stack([out.resid[0]["resid_pre"][:, 0]] + [r["resid_post"][:, 0] for r in out.resid])
        return out.logits[:, -1], stream

    def decode(self, batch: Sequence[Request], plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor, Traces | None]:
        """One step of every running row: (logits (B, V), the slots of the rows' next tokens to sample into, traces)."""
        B = len(batch)
        tokens, pos, cache = self._step_views(B)  # (B,), (B,): each row's last token and its position
        logits, stream = self.decode_step(tokens, cache, pos, plan.edits, plan.trace_rows)  # (B, V)
        traces = None
        if stream is not None:
            traces = self._traces(batch, plan, stream, [r.position for r in batch])
        pos += 1  # in place: the next tokens go one further
        return logits, tokens, traces

    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        """Carry out the scheduler's row moves (src, dst): the cache, next token and position of each."""
        for src, dst in moves:
            self.cache.copy_row(src, dst)
            self._tokens[dst] = self._tokens[src]
            self._positions[dst] = self._positions[src]

    def _step_views(self, B: int) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """The first B rows' next tokens, positions and cache, as views made once per batch size."""
        views = self._views.get(B)
        if views is None or views[0] is not self.cache:
            views = self._views[B] = (self.cache, self._tokens[:B], self._positions[:B], self.cache.rows(0, B))
        return views[1], views[2], views[3]

    def _traces(self, batch: Sequence[Request], plan: BatchPlan, stream: torch.Tensor, positions: list[int]) -> Traces:
        """Per row of the batch, the trace of the position that produced its next token (None if not asked).

        `stream` (L + 1, R, C) holds the traced rows' embedding and resid_post of every layer at `positions`.
        """
        traced = plan.traced
        params = [batch[i].params for i in traced]
        per_row = stream_trace(
            self.model, stream, [p.logit_lens_top for p in params], [p.lens for p in params], self.lens
        )
        out: Traces = [None] * len(batch)
        for j, (i, t) in enumerate(zip(traced, per_row, strict=True)):
            row = out[i] = {"position": positions[i], **t}
            if batch[i].params.return_stream:  # the vectors, from the same step: handed to the event, not the trace
                row["stream"] = stream[list(batch[i].params.return_stream), j].float().clone()  # (n, C)
        return out
