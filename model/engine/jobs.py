"""Time-shared jobs (diagnostics, prompt scoring) on the engine's worker, between decode steps, and their share."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, InvalidStateError
from typing import Any

from model.engine.api import EngineDrainingError
from model.transformer import Transformer

Job = Callable[[Transformer], Generator[None, None, Any]]


class JobQueue:
    """Jobs run one slice (up to their next yield) at a time. While sequences decode, jobs take at most `share` of the
    worker's time: a slice runs only when decode time has paid off the slices before it at share / (1 - share)."""

    def __init__(self, model: Transformer, share: float = 1.0) -> None:
        self.model = model
        self.share = share
        self._jobs: collections.deque[tuple[Generator[None, None, Any], Future]] = collections.deque()
        self._debt = 0.0  # job seconds not yet matched by decode time

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> Future:
        """Queue `job(model)`; its return value resolves the future (the caller holds the engine's lock)."""
        fut: Future = Future()
        self._jobs.append((job(self.model), fut))
        return fut

    def run_slice(self, decoding: bool) -> None:
        """One slice of the oldest job, unless decoding is owed time; jobs whose caller gave up are dropped first."""
        while self._jobs and self._jobs[0][1].done():  # cancelled by its caller (timeout, disconnect)
            self._jobs.popleft()[0].close()
        if not decoding:
            self._debt = 0.0  # nothing decodes: jobs may use the whole worker
        if not self._jobs or (decoding and self._debt > 0):
            return
        gen, fut = self._jobs[0]
        t0 = time.perf_counter()
        try:
            next(gen)
        except StopIteration as stop:
            self._jobs.popleft()
            _resolve(fut, result=stop.value)
        except Exception as e:  # noqa: BLE001 - delivered to the caller
            self._jobs.popleft()
            _resolve(fut, error=e)
        if decoding and self.share < 1:
            self._debt += time.perf_counter() - t0

    def paid(self, decode_s: float) -> None:
        """Decoding ran for `decode_s` seconds: it pays off job time at share / (1 - share)."""
        self._debt = max(0.0, self._debt - decode_s * self.share / (1 - self.share))

    def fail_all(self, message: str) -> None:
        """Close every job and fail its future with EngineDrainingError(message)."""
        while self._jobs:
            gen, fut = self._jobs.popleft()
            gen.close()
            _resolve(fut, error=EngineDrainingError(message))


def _resolve(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Settle a job's future, unless its caller already cancelled it (setting it then would raise in the worker)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
