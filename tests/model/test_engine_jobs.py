"""Engine jobs (diagnostics) next to generation: the time share, cancellation, abort past the drain deadline, and
the gradient pass yielding per block."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import Any

import pytest
import torch

from model.diagnostics import DiagnosticsOptions, iter_diagnostics
from model.engine import Engine, EngineDrainingError, SamplingParams
from model.transformer import Transformer
from tests.conftest import TINY, build_model
from tests.model.test_engine import events_of, run_with_engine


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(seed=3)


def sleeping_job(slices: int, slice_s: float, log: list[tuple[str, float, float]] | None = None):
    """A job of `slices` slices that each take `slice_s` (recorded in `log` as ("job", start, end))."""

    def job(_model: Any) -> Generator[None, None, str]:
        for _ in range(slices):
            t0 = time.perf_counter()
            time.sleep(slice_s)
            if log is not None:
                log.append(("job", t0, time.perf_counter()))
            yield
        return "done"

    return job


def test_jobs_take_at_most_their_share_while_sequences_decode(model: Transformer) -> None:
    """With job_share=0.5, between two job slices decoding gets at least as much worker time as the slice took."""
    log: list[tuple[str, float, float]] = []

    async def body(engine: Engine) -> None:
        real = engine._decode

        def timed_decode() -> None:
            t0 = time.perf_counter()
            time.sleep(0.002)  # a step of a bigger model
            real()
            log.append(("decode", t0, time.perf_counter()))

        engine._decode = timed_decode  # type: ignore[method-assign]
        handle = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=TINY["block_size"] - 4, temperature=0))
        while not engine.n_running:
            await asyncio.sleep(0.001)
        fut = engine.run_job(sleeping_job(4, 0.004, log))
        assert await asyncio.wait_for(asyncio.wrap_future(fut), 20) == "done"
        await events_of(handle)

    run_with_engine(model, body, job_share=0.5)
    job_ends = [i for i, (kind, _, _) in enumerate(log) if kind == "job"]
    last_decode = max(i for i, (kind, _, _) in enumerate(log) if kind == "decode")
    assert len(job_ends) == 4 and job_ends[-1] < last_decode  # the generation outlasted the job
    for a, b in zip(job_ends, job_ends[1:], strict=False):
        decoded = sum(end - start for kind, start, end in log[a + 1 : b] if kind == "decode")
        _, s0, s1 = log[a]
        assert decoded >= (s1 - s0) * 0.999, (decoded, s1 - s0)  # share 0.5: decode time >= job time


def test_a_cancelled_job_is_dropped_and_the_worker_lives_on(model: Transformer) -> None:
    """The caller cancels a job's future (timeout, client gone): the job is closed before its next slice, nothing
    raises on the worker, and a generation running next to it ends normally."""
    closed: list[bool] = []

    def job(_model: Any) -> Generator[None, None, str]:
        try:
            while True:
                time.sleep(0.005)
                yield
        except GeneratorExit:
            closed.append(True)
            raise

    async def body(engine: Engine) -> str:
        handle = engine.submit([5, 6], SamplingParams(max_new_tokens=20, temperature=0))
        fut = engine.run_job(job)
        await asyncio.sleep(0.05)
        assert fut.cancel()
        deadline = time.monotonic() + 10
        while engine.n_jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        _, fin = await events_of(handle)
        # a job whose caller gave up while its last slice ran: settling its future must not raise on the worker
        fut2 = engine.run_job(sleeping_job(1, 0.05))
        await asyncio.sleep(0.01)
        fut2.cancel()
        fin2 = (await events_of(engine.submit([7], SamplingParams(max_new_tokens=3, temperature=0))))[1]
        return f"{fin.reason},{fin2.reason},{engine.n_jobs}"

    assert run_with_engine(model, body) == "length,length,0"
    assert closed == [True]


def test_abort_all_ends_requests_and_fails_jobs(model: Transformer) -> None:
    async def body(engine: Engine) -> tuple[str, str, str]:
        real = engine._decode

        def slow_decode() -> None:  # 30 steps take 0.3 s at least: the abort comes while the first row runs
            time.sleep(0.01)
            real()

        engine._decode = slow_decode  # type: ignore[method-assign]
        running = engine.submit([1], SamplingParams(max_new_tokens=TINY["block_size"] - 2, temperature=0))
        waiting = engine.submit([2], SamplingParams(max_new_tokens=TINY["block_size"] - 2, temperature=0))
        fut = engine.run_job(sleeping_job(1000, 0.002))
        while not engine.n_running:
            await asyncio.sleep(0.001)
        engine.abort_all()
        _, fin_running = await events_of(running)
        _, fin_waiting = await events_of(waiting)
        with pytest.raises(EngineDrainingError):
            await asyncio.wait_for(asyncio.wrap_future(fut), 10)
        with pytest.raises(EngineDrainingError):
            engine.run_job(sleeping_job(1, 0))
        return fin_running.reason, fin_waiting.reason, str(engine.n_jobs)

    assert run_with_engine(model, body, max_batch_size=1) == ("abort", "abort", "0")


def test_gradients_yield_after_the_forward_and_each_block(model: Transformer) -> None:
    """The gradient pass is cut into one block of the forward and one block of the backward at a time, so a stream
    waits at most one of those (not a whole forward + backward) for a diagnostics job."""
    ids = list(range(40, 40 + TINY["block_size"]))
    steps = iter_diagnostics(model, ids, DiagnosticsOptions(gradients=True))
    n = 0
    with pytest.raises(StopIteration):
        while True:
            next(steps)
            n += 1
    # each block of the forward, the loss, each block's backward, then the per-layer statistics
    assert n == TINY["n_layer"] + 1 + TINY["n_layer"] + 1
    assert torch.is_grad_enabled()  # no grad mode leaked out of the job
