"""Which requests run: the waiting queue, the running rows, admission and reaping.

Row i of the running batch is row i of the KV cache. Rows that end leave at once and live rows stay contiguous: each
hole below the new size takes one of the live rows above it. The scheduler decides those moves and returns them; the
engine has the runner carry them out (the scheduler never touches the cache), and sends the finish events.

Chunked prefill (`prefill_chunk` tokens, 0: off): while rows run, a step prefills at most `prefill_chunk` prompt
tokens, so running streams wait at most one chunk for a newcomer. A longer prompt is *staged*: it holds the last
cache row (the staging row, which admission of others never takes: running + staged <= max_batch_size) and is
prefilled one chunk per step (`next_chunk`, `chunk_done`) after the running rows' decode; one at a time. On its last
chunk it joins the running rows at row len(running) (the engine has the runner copy the staging row there). With no
row running, prompts are prefilled in one piece (the best time to first token), a staged one's rest too.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

from model.engine.api import QueueFullError
from model.engine.batch import BatchPlan
from model.engine.request import Request


class Reaped(NamedTuple):
    """What a reap found: the requests that ended with their reasons, and the row moves (src, dst) that keep the
    running rows contiguous."""

    ended: list[tuple[Request, str]]
    moves: list[tuple[int, int]]


NOTHING = Reaped([], [])  # (never appended to)


@dataclass
class Staged:
    """A request whose prompt is prefilled in chunks into the staging row; `done`: its prompt tokens prefilled."""

    req: Request
    row: int
    plan: BatchPlan  # the request's own (one row)
    done: int = 0


class Chunk(NamedTuple):
    """Prompt positions [start, stop) of the staged request, to prefill into cache row `row`."""

    req: Request
    row: int
    start: int
    stop: int
    plan: BatchPlan

    @property
    def last(self) -> bool:
        return self.stop == len(self.req.prompt)


class Scheduler:
    """Admits waiting requests into free rows and reaps ended ones. `lock` guards the waiting queue (submitters
    append to it from the event loop); everything else is the worker's."""

    def __init__(
        self,
        lock: threading.Condition,
        device: torch.device,
        *,
        max_batch_size: int,
        max_queue: int,
        prefill_tokens: int,
        prefill_chunk: int = 0,
    ) -> None:
        self._lock, self._device = lock, device
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.prefill_tokens = prefill_tokens  # padded prompt tokens per batched prefill (bounds the decode stall)
        self.prefill_chunk = prefill_chunk  # prompt tokens a step prefills while rows run (0: no chunking)
        self.staged: Staged | None = None  # the request being prefilled in chunks, in the staging row
        self.running: list[Request] = []  # row i of the cache belongs to running[i]
        self.waiting: collections.deque[Request] = collections.deque()
        self._plan: BatchPlan | None = None  # the running batch's, None: to work out again
        self._dirty = False  # a row may have ended (finished, cancelled, its loop closed)

    def add(self, req: Request) -> None:
        """Queue a request (the caller holds the lock)."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"queue is full ({self.max_queue} requests waiting)")
        self.waiting.append(req)

    def mark_dirty(self) -> None:
        """A row may have ended: the next reap looks at every row (set after the reason, e.g. `cancelled`)."""
        self._dirty = True

    def plan(self) -> BatchPlan:
        """The running batch's plan, worked out again after its rows changed."""
        if self._plan is None:
            self._plan = BatchPlan.of(self.running, self._device)
        return self._plan

    def steady(self, now: float) -> bool:
        """Whether the next step can go straight to its decode: rows run, their plan stands, none may have ended, no
        deadline passed, nobody waits."""
        plan = self._plan
        return (
            plan is not None
            and not self._dirty
            and not self.waiting
            and self.staged is None
            and bool(self.running)
            and now <= plan.deadline
        )

    @property
    def chunking(self) -> bool:
        """Whether prompts are chunked now: chunking is on and rows run (a step then prefills one budget)."""
        return self.prefill_chunk > 0 and bool(self.running)

    def admit(self) -> tuple[list[Request], list[Request]]:
        """(the next waiting requests to prefill together, up to `prefill_tokens` padded tokens and the free rows;
        the cancelled ones found on the way, to finish with `abort`).

        Fair between groups (client requests), not only rows: each free row goes to the first waiting request of
        the group with the fewest rows running or admitted, so one request of many rows cannot hold back a small
        one for longer than one of its rows runs.

        While rows run and chunking is on, the step's budget is `prefill_chunk` padded tokens, and a staged prompt
        has it all (nothing is admitted); a prompt longer than the budget that comes first is staged (`staged`)."""
        batch: list[Request] = []
        dropped: list[Request] = []
        chunking = self.chunking
        if chunking and self.staged is not None:
            return batch, dropped
        budget = min(self.prefill_tokens, self.prefill_chunk) if chunking else self.prefill_tokens
        width = 0  # longest prompt in the batch
        rows = collections.Counter(r.group for r in self.running)
        if self.staged is not None:
            rows[self.staged.req.group] += 1
        while len(self.running) + len(batch) + (self.staged is not None) < self.max_batch_size:
            stage = False
            with self._lock:
                if not self.waiting:
                    break
                req = self._next(rows)
                if not req.cancelled and max(width, len(req.prompt)) * (len(batch) + 1) > budget:
                    if batch:
                        break
                    stage = chunking  # (else a longer prompt goes alone, in one piece)
                self.waiting.remove(req)
            if req.cancelled:
                dropped.append(req)
                continue
            if stage:
                self.staged = Staged(req, self.max_batch_size - 1, BatchPlan.of([req], self._device))
                break
            batch.append(req)
            rows[req.group] += 1
            width = max(width, len(req.prompt))
        return batch, dropped

    def _next(self, rows: collections.Counter) -> Request:
        """The first waiting request of the group with the fewest rows (a cancelled one first: it is dropped)."""
        best, fewest = self.waiting[0], None
        for r in self.waiting:
            if r.cancelled:
                return r
            n = rows[r.group]
            if fewest is None or n < fewest:
                best, fewest = r, n
                if n == 0:
                    break
        return best

    def next_chunk(self) -> Chunk:
        """The staged request's next chunk: `prefill_chunk` tokens while rows run, else the rest of its prompt."""
        s = self.staged
        assert s is not None, "no staged prefill"
        rest = len(s.req.prompt) - s.done
        n = min(rest, self.prefill_chunk) if self.running and self.prefill_chunk else rest
        return Chunk(s.req, s.row, s.done, s.done + n, s.plan)

    def chunk_done(self, chunk: Chunk) -> int | None:
        """`chunk` was prefilled. After the last one the request joins the running rows: returns its row there
        (None before)."""
        s = self.staged
        assert s is not None and s.req is chunk.req and s.done == chunk.start, "not the staged request's next chunk"
        s.done = chunk.stop
        if not chunk.last:
            return None
        self.staged = None
        return self.join([chunk.req])

    def join(self, batch: list[Request]) -> int:
        """The prefilled `batch` joins the running rows; returns its first row."""
        row = len(self.running)
        self.running.extend(batch)
        self._plan = None
        return row

    def cancel_all(self) -> None:
        """Mark every running and waiting request cancelled (the drain deadline passed)."""
        with self._lock:
            for r in itertools.chain(self.running, self.waiting, [self.staged.req] if self.staged else ()):
                r.cancelled = True
        self._dirty = True

    def reap(self, now: float) -> Reaped:
        """Remove finished, cancelled and timed-out requests, running, staged or waiting."""
        plan = self._plan
        if not self._dirty and not self.waiting and self.staged is None and plan is not None and now <= plan.deadline:
            return NOTHING  # the common case after a step: no row can have ended
        ended: list[tuple[Request, str]] = []
        moves: list[tuple[int, int]] = []
        # the rows are looked at only when one may have ended: a token finished it, it was cancelled, or a deadline
        # passed (cleared before looking: a cancel that comes during the look is seen now or at the next reap)
        if self._dirty or plan is None or now > plan.deadline:
            self._dirty = False
            rows: list[int] = []
            for i, r in enumerate(self.running):
                reason = r.finish_reason
                if reason is None and r.cancelled:
                    reason = "abort"
                if reason is None and r.deadline is not None and now > r.deadline:
                    reason = "timeout"
                if reason is not None:
                    rows.append(i)
                    ended.append((r, reason))
            if rows:
                moves = self._remove_rows(rows)
        if self.staged is not None:
            r = self.staged.req
            if r.cancelled or (r.deadline is not None and now > r.deadline):
                self.staged = None  # (its staging row's contents are never read: the next use writes from position 0)
                ended.append((r, "abort" if r.cancelled else "timeout"))
        if self.waiting:
            with self._lock:
                expired = [r for r in self.waiting if r.cancelled or (r.deadline is not None and now > r.deadline)]
                for r in expired:
                    self.waiting.remove(r)
            ended += [(r, "abort" if r.cancelled else "timeout") for r in expired]
        return Reaped(ended, moves)

    def _remove_rows(self, ended: list[int]) -> list[tuple[int, int]]:
        """Drop rows `ended` (ascending): each hole below the new size takes one of the live rows above it; ended
        rows are never moved. Returns the moves (src, dst)."""
        running = self.running
        keep = len(running) - len(ended)
        gone = set(ended)
        holes = [i for i in ended if i < keep]
        movers = [j for j in range(keep, len(running)) if j not in gone]
        moves = list(zip(movers, holes, strict=True))
        for src, dst in moves:
            running[dst] = running[src]
        del running[keep:]
        self._plan = None
        return moves

    def clear(self) -> list[Request]:
        """Take every running and waiting request out (the worker failed or stops); returns them."""
        with self._lock:
            out = list(self.running) + ([self.staged.req] if self.staged else []) + list(self.waiting)
            self.running.clear()
            self.waiting.clear()
            self.staged = None
        self._plan = None
        return out
