"""Sampled tokens to events, and events to each request's event loop.

Runs on the worker. Every event of one step reaches its event loop with one `call_soon_threadsafe` (one wake-up per
loop per step); the event loop only puts them on the requests' queues.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from model.engine.api import EngineObserver, Event, FinishEvent, TokenEvent
from model.engine.request import Request
from model.engine.sampler import Sampled


class OutputProcessor:
    """Turns a step's sampled tokens into token events (text, logprobs, trace, timings) and requests' ends into finish
    events, and delivers them. `on_undeliverable` is called when a request's event loop is closed (nobody listens):
    those requests are marked cancelled and the scheduler should look at its rows."""

    def __init__(self, observer: EngineObserver, on_undeliverable: Callable[[], None]) -> None:
        self.observer = observer
        self._on_undeliverable = on_undeliverable
        self._put_all = functools.partial(_put_all, on_overflow=on_undeliverable)

    def tokens(
        self, batch: Sequence[Request], sampled: Sampled, traces: list[dict[str, Any] | None] | None = None
    ) -> bool:
        """Send each row of `batch` its sampled token; True when a row ended (stop string or length)."""
        now = time.perf_counter()
        observer = self.observer
        lp = sampled.logprobs
        gaps = []
        ended = False
        events: list[tuple[Request, Event]] = []
        for i, (r, tok) in enumerate(zip(batch, sampled.tokens, strict=True)):
            n = r.n_generated = r.n_generated + 1
            if r.t_first is None:
                r.t_first = now
                observer.on_first_token(now - r.t_submit)
            else:
                gaps.append(now - r.t_last)  # type: ignore[operator]
            r.t_last = now
            last = n >= r.params.max_new_tokens
            text, stopped = r.text.push(tok, last)
            trace = traces[i] if traces is not None else None
            vectors = trace.pop("stream", None) if trace is not None else None
            ev = TokenEvent(tok, text, None, None, trace if r.params.traced else None, vectors)
            if lp is not None and (k := r.params.logprobs) > 0:
                ev.logprob = lp[0][i]
                ev.top_logprobs = list(zip(lp[2][i][:k], lp[1][i][:k], strict=True))
            events.append((r, ev))
            if stopped or last:
                r.finish_reason = "stop" if stopped else "length"
                ended = True
        self.deliver(events)
        if gaps:
            observer.on_tokens(gaps)
        return ended

    def finish(self, ended: Sequence[tuple[Request, str, str | None]]) -> None:
        """Send each (request, reason, error) its finish event."""
        self.deliver([(r, self.finish_event(r, reason, error)) for r, reason, error in ended])

    def finish_event(self, r: Request, reason: str, error: str | None = None) -> FinishEvent:
        """The request's finish event (reported to the observer)."""
        now = time.perf_counter()
        timings = {
            "queue_s": (r.t_prefill - r.t_submit) if r.t_prefill else now - r.t_submit,
            "ttft_s": (r.t_first - r.t_submit) if r.t_first else None,
            "total_s": now - r.t_submit,
        }
        self.observer.on_finish(reason, now - r.t_submit, r.n_generated)
        return FinishEvent(
            reason=reason,
            text=r.text.text,
            prompt_tokens=len(r.prompt),
            completion_tokens=r.n_generated,
            seed=r.seed,
            timings=timings,
            error=error,
        )

    def deliver(self, events: list[tuple[Request, Event]]) -> None:
        """Queue each event to its request, in order, with one `call_soon_threadsafe` (one wake-up) per event loop."""
        if not events:
            return
        loop = events[0][0].loop
        groups = {loop: events}
        if any(r.loop is not loop for r, _ in events):  # rows of several event loops (e.g. one per test)
            groups = {}
            for item in events:
                groups.setdefault(item[0].loop, []).append(item)
        for loop, group in groups.items():
            try:
                loop.call_soon_threadsafe(self._put_all, group)
            except RuntimeError:  # the event loop is closed: nobody is listening
                for r, _ in group:
                    r.cancelled = True
                self._on_undeliverable()


STALL_S = 5.0  # a consumer that took no event for this long, with `max_pending` waiting, has stopped reading


def _put_all(events: list[tuple[Request, Event]], on_overflow: Callable[[], None]) -> None:
    """On the requests' event loop: put each event on its request's queue. A request whose consumer has
    `max_pending` events unread and took none for STALL_S (a client that stopped reading; a reading one is never
    cut by a burst) is cancelled: its queue is emptied (the memory goes back at once) and holds only an `overflow`
    finish event; later events of it are dropped."""
    for r, ev in events:
        if r.overflowed:
            continue
        queue = r.queue
        if (
            r.max_pending
            and queue.qsize() >= r.max_pending
            and r.loop.time() - getattr(queue, "taken_at", float("-inf")) > STALL_S
        ):
            while not queue.empty():
                queue.get_nowait()
            r.overflowed = r.cancelled = True
            on_overflow()  # (after `cancelled`) the worker's next reap drops the row
            error = f"the client fell {r.max_pending} events behind (SHORTCUT_MAX_PENDING_EVENTS); read faster"
            ev = FinishEvent("overflow", r.text.text, len(r.prompt), r.n_generated, r.seed, {}, error)
        queue.put_nowait(ev)
