"""Issue #24 items 1 and 4 at the engine: admission is fair between requests (groups of rows), counted in decode
steps; a request whose consumer stops reading is cancelled once `max_pending_events` wait (its memory goes back)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from model.config import ModelConfig
from model.engine import Engine, EngineObserver, FinishEvent, SamplingParams, output
from model.transformer import Transformer
from tests.conftest import TINY, build_model

BIG_PROMPT, SMALL_PROMPT = [65, 66, 67], [70, 71, 72, 73, 74]  # told apart by their lengths in on_prefill
ROW_TOKENS = 10  # every row of the big request runs this many steps


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(ModelConfig(**TINY), seed=0)


class Steps(EngineObserver):
    """Counts decode steps; records the step at which each prompt length was prefilled, and finish reasons."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps = 0
        self.prefilled: list[tuple[int, int]] = []  # (prompt length, decode steps run before it)
        self.finished: list[str] = []

    def on_step(self, batch_size: int) -> None:
        with self.lock:
            self.steps += 1

    def on_prefill(self, prompt_tokens: int, queue_time_s: float) -> None:
        with self.lock:
            self.prefilled.append((prompt_tokens, self.steps))

    def on_finish(self, reason: str, e2e_s: float, completion_tokens: int) -> None:
        with self.lock:
            self.finished.append(reason)

    def step_of(self, prompt_len: int) -> int:
        return next(s for n, s in self.prefilled if n == prompt_len)


async def wait_for(cond, timeout: float = 20.0) -> None:  # noqa: ANN001 - a predicate
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.005)


def test_a_small_request_starts_within_one_row_of_a_huge_one(model: Transformer) -> None:
    """12 rows of one request fill 4 slots (3 waves of ROW_TOKENS steps); a 1-row request sent after the first step
    is prefilled when the first slot frees: within ROW_TOKENS steps, not after the big request's 12 rows (FIFO)."""
    rec = Steps()
    big = SamplingParams(max_new_tokens=ROW_TOKENS, temperature=0.0)
    small = SamplingParams(max_new_tokens=2, temperature=0.0)

    async def body() -> int:
        engine = Engine(model, max_batch_size=4, max_queue=64, observer=rec, decode_weights="float32")
        group = object()
        handles = [engine.submit(BIG_PROMPT, big, group) for _ in range(12)]
        engine.start()
        try:
            await wait_for(lambda: rec.steps >= 1)
            submitted_at = rec.steps
            handles.append(engine.submit(SMALL_PROMPT, small))
            done = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
            assert [fin.reason for _, fin in done] == ["length"] * 13
            return rec.step_of(len(SMALL_PROMPT)) - submitted_at
        finally:
            engine.stop()

    waited = asyncio.run(body())
    assert waited <= ROW_TOKENS, f"the small request waited {waited} decode steps (at most one row's {ROW_TOKENS})"


def test_free_rows_alternate_between_waiting_requests(model: Transformer) -> None:
    """Two requests queued before the worker starts, the big one first: the first admission takes rows of both."""
    rec = Steps()

    async def body() -> None:
        engine = Engine(model, max_batch_size=4, max_queue=64, observer=rec, decode_weights="float32")
        group = object()
        params = SamplingParams(max_new_tokens=3, temperature=0.0)
        handles = [engine.submit(BIG_PROMPT, params, group) for _ in range(8)]
        handles.append(engine.submit(SMALL_PROMPT, params))
        engine.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 60)
        finally:
            engine.stop()

    asyncio.run(body())
    assert rec.step_of(len(SMALL_PROMPT)) == 0  # FIFO would prefill it after two waves of the big request


def test_a_consumer_that_stops_reading_is_cancelled_at_the_bound(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody reads the request's events: once 4 wait (and it took none for STALL_S, here 0), the queue is emptied to
    one `overflow` finish event, the row leaves the batch (finished as abort) and nothing more is queued for it."""
    monkeypatch.setattr(output, "STALL_S", 0.0)
    rec = Steps()

    async def body() -> list:
        engine = Engine(model, max_batch_size=2, observer=rec, decode_weights="float32", max_pending_events=4)
        engine.start()
        try:
            handle = engine.submit(BIG_PROMPT, SamplingParams(max_new_tokens=25, temperature=0.0))
            await wait_for(lambda: rec.finished)
            await wait_for(lambda: engine.n_running == 0 and engine.n_waiting == 0)
            await asyncio.sleep(0.05)  # any event still on its way would land now
            queued = []
            while not handle._queue.empty():
                queued.append(handle._queue.get_nowait())
            return queued
        finally:
            engine.stop()

    queued = asyncio.run(body())
    assert len(queued) == 1 and isinstance(queued[0], FinishEvent), queued
    assert queued[0].reason == "overflow" and "SHORTCUT_MAX_PENDING_EVENTS" in (queued[0].error or "")
    assert rec.finished == ["abort"]
    assert rec.steps < 25  # cancelled long before its 25 tokens


def test_a_consumer_that_reads_is_never_cut(model: Transformer) -> None:
    """The same bound with a reading consumer (bursts of more than 4 events between its turns are likely with this
    tiny model): all 25 tokens and a normal finish."""

    async def body() -> tuple:
        engine = Engine(model, max_batch_size=2, decode_weights="float32", max_pending_events=4)
        engine.start()
        try:
            handle = engine.submit(BIG_PROMPT, SamplingParams(max_new_tokens=25, temperature=0.0))
            return await asyncio.wait_for(handle.result(), 30)
        finally:
            engine.stop()

    tokens, fin = asyncio.run(body())
    assert (len(tokens), fin.reason) == (25, "length")
