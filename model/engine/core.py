"""The engine: a worker thread that runs one step at a time, schedule -> run -> sample -> emit.

One worker thread owns the model. Waiting requests are prefilled into free KV-cache rows and join the running batch;
every step decodes one token for all running rows in one batched call. Finished or cancelled rows leave at once.
Tokens reach each request through its own asyncio queue, every row's token of a step with one wake-up of the event
loop; the event loop never runs model code. No HTTP and no Prometheus here: an `EngineObserver` receives the numbers.

The parts, each with its own state: the `Scheduler` (waiting and running requests, admission, reaping), the
`ModelRunner` (the decode step, the cache, prefills), `sampler.sample` (logits to tokens), the `OutputProcessor`
(tokens to events, delivery) and the `JobQueue` (time-shared jobs). A steady batch (no job, no waiting request, no
row that may have ended) goes straight to its decode.

A long prompt that arrives while rows run is prefilled in chunks of `prefill_chunk` tokens, one after each decode
step (chunked prefill, see `model.engine.scheduler`), so the running streams never wait for a whole prompt.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any

import torch

from model.engine.api import (
    MAX_SEED,
    EngineDrainingError,
    EngineObserver,
    EventQueue,
    RequestHandle,
    SamplingParams,
)
from model.engine.batch import BatchPlan
from model.engine.jobs import JobQueue
from model.engine.output import OutputProcessor
from model.engine.request import Limits, Request, check_request
from model.engine.runner import ModelRunner, Traces
from model.engine.sampler import Sampled, sample
from model.engine.scheduler import Scheduler
from model.kv_cache import KVCache
from model.lens import TunedLens
from model.sampling import LogitControls
from model.textstream import TextStream
from model.transformer import Transformer

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching generation over one model, driven by a worker thread."""

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        request_timeout_s: float | None = None,
        observer: EngineObserver | None = None,
        max_stop_strings: int = 16,
        max_stop_length: int = 64,
        max_logprobs: int = 20,
        prefill_tokens: int = 512,
        decode_weights: str = "auto",
        job_share: float = 1.0,
        decode_backend: str = "auto",
        kv_cache_dtype: str = "auto",
        max_pending_events: int = 0,
        lens: TunedLens | None = None,
        no_tuned_lens: str = "this model has no tuned lens",
        decode_threads: int = 1,
        prefill_chunk: int = 32,
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.request_timeout_s = request_timeout_s
        self.max_pending_events = max_pending_events  # per request; 0 = no limit
        self.observer = observer or EngineObserver()
        no_lens = None if lens is not None else no_tuned_lens  # `no_tuned_lens`: what lens="tuned" answers without one
        self.limits = Limits(model.config, max_stop_strings, max_stop_length, max_logprobs, no_lens)
        self.runner = ModelRunner(
            self.model,
            max_batch_size,
            decode_weights=decode_weights,
            decode_backend=decode_backend,
            kv_cache_dtype=kv_cache_dtype,
            lens=lens,
            decode_threads=decode_threads,
        )
        self.device = self.runner.device
        self._cv = threading.Condition(threading.Lock())
        self.scheduler = Scheduler(
            self._cv,
            self.device,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            prefill_tokens=prefill_tokens,
            prefill_chunk=prefill_chunk,
        )
        self.output = OutputProcessor(self.observer, self.scheduler.mark_dirty)
        self.jobs = JobQueue(self.model, job_share)
        self._ids = itertools.count(1)
        self._accepting = True
        self._stop = False
        self._aborting = False  # drain deadline passed: end everything within one step
        self._thread: threading.Thread | None = None
        self._reported: tuple[int, int] | None = None  # the last queue sizes told to the observer
        self.steps = 0

    # ---- settings and state, read-only ---------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @property
    def prefill_tokens(self) -> int:
        return self.scheduler.prefill_tokens

    @property
    def prefill_chunk(self) -> int:
        return self.scheduler.prefill_chunk

    @property
    def decode_step(self) -> Any:
        """The decode step (`model.fast.FusedDecoder` or `model.decode.FastDecoder`)."""
        return self.runner.decode_step

    @property
    def decode_backend(self) -> str:
        return self.runner.decode_backend

    @property
    def decode_weights(self) -> str:
        return self.runner.decode_weights

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.runner.kv_cache_dtype

    @property
    def cache(self) -> KVCache:
        return self.runner.cache

    @property
    def n_running(self) -> int:
        """Sequences in the running batch, and one whose prompt is being prefilled in chunks."""
        return len(self.scheduler.running) + (self.scheduler.staged is not None)

    @property
    def n_waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self.scheduler.waiting)

    @property
    def n_jobs(self) -> int:
        """Jobs (e.g. diagnostics) queued or running on the worker."""
        return len(self.jobs)

    @property
    def accepting(self) -> bool:
        """False once draining or stopped."""
        return self._accepting

    # ---- public API (event-loop side) ---------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="shortcut-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; requests still in flight finish with reason `abort`."""
        with self._cv:
            self._accepting, self._stop = False, True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def warm_up(self, rows: int = 4, steps: int = 3) -> None:
        """Run a prefill and a few decode steps (plain, then edited and traced) off the worker, before `start`."""
        if self._thread is not None:
            raise RuntimeError("warm up before start: the worker owns the cache")
        self.runner.warm_up(min(rows, self.max_batch_size), steps)

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError / PromptTooLongError for a request the engine cannot serve."""
        check_request(prompt, params, self.limits)

    def submit(self, prompt: list[int], params: SamplingParams, group: object = None) -> RequestHandle:
        """Queue a request (call from the event loop); raise on invalid input, a full queue or draining.

        Requests submitted with the same `group` (e.g. the choices of one HTTP request) are one client's: free rows
        go first to the waiting group with the fewest running rows, so a small request next to a large one starts
        at the first row that frees. None: a group of its own."""
        self.validate(prompt, params)
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED)
        now = time.perf_counter()
        req = Request(
            id=next(self._ids),
            prompt=list(prompt),
            params=params,
            seed=seed,
            loop=asyncio.get_running_loop(),
            queue=EventQueue(),
            t_submit=now,
            deadline=now + self.request_timeout_s if self.request_timeout_s else None,
            generator=torch.Generator().manual_seed(seed),
            text=TextStream(params.stop),
            edits=params.intervention.compile(self.config.n_layer, self.device, n_prompt=len(prompt))
            if params.intervention
            else None,
            controls=LogitControls.create(list(prompt), params, self.config.vocab_size, self.device),
            max_pending=self.max_pending_events,
        )
        req.group = group if group is not None else ("request", req.id)
        with self._cv:
            if not self._accepting:
                raise EngineDrainingError("server is shutting down and accepts no new requests")
            self.scheduler.add(req)
            self._cv.notify_all()
        self.observer.on_queue_change(self.n_running, self.n_waiting)
        self._reported = None  # the worker may have reported in between: it reports again at its next reap
        return RequestHandle(req.id, seed, req.queue, lambda: self._cancel(req))

    def _cancel(self, req: Request) -> None:
        req.cancelled = True
        self.scheduler.mark_dirty()  # after `cancelled`: the worker's next reap looks at every row
        with self._cv:
            self._cv.notify_all()

    def run_job(self, job: Callable[[Transformer], Generator[None, None, Any]]) -> Future:
        """Run `job(model)` on the worker between decode steps.

        The job is a generator function: it should yield after each forward pass, so running
        generation never stalls for more than one of its passes. Its return value resolves the future;
        cancelling the future (caller timed out or left) drops the job before its next slice. While
        sequences decode, jobs get at most `job_share` of the worker's time (one slice, then decode
        steps until decoding has had its share).
        """
        with self._cv:
            if self._stop or not self._accepting:
                raise EngineDrainingError("server is shutting down and accepts no new requests")
            fut = self.jobs.add(job)
            self._cv.notify_all()
        return fut

    def begin_drain(self) -> None:
        """Stop accepting new requests; running and waiting ones finish."""
        with self._cv:
            self._accepting = False
            self._cv.notify_all()

    def abort_all(self) -> None:
        """The drain deadline passed: within one step every running and waiting request finishes with reason
        `abort` and every job fails with EngineDrainingError."""
        with self._cv:
            self._accepting, self._aborting = False, True
            self._cv.notify_all()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs or waits; True if it got there within `timeout` seconds."""
        end = time.monotonic() + timeout
        while self.n_running or self.n_waiting or self.n_jobs:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.02)
        return True

    # ---- worker side ---------------------------------------------------------------------------

    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        sched = self.scheduler
        while True:
            if not sched.running:  # (rows decoding are work enough: no need to take the lock to look for more)
                with self._cv:
                    while not (self._stop or sched.running or sched.staged or sched.waiting or self.jobs):
                        self._cv.wait()
            if self._stop:
                break
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a bug must fail the requests, not kill the worker silently
                log.exception("engine step failed")
                error = f"internal engine error: {type(e).__name__}"
                self.output.finish([(r, "error", error) for r in sched.clear()])
                self._report_queue()
        self.output.finish([(r, "abort", "engine stopped") for r in sched.clear()])
        self.jobs.fail_all("engine stopped")

    def _step(self) -> None:
        """schedule -> run -> sample -> emit."""
        sched = self.scheduler
        if self.jobs or self._aborting or not sched.steady(time.perf_counter()):
            # (else the steady state: no job to run, no request to admit, no row that may have ended)
            if self._aborting:
                self.jobs.fail_all("server is shutting down: the drain timeout passed")
            self.jobs.run_slice(decoding=bool(sched.running))
            self._reap()
            self._admit()
            self._reap()  # a request can finish on its prefill token (max_new_tokens=1, stop): it must not decode again
        if sched.running:
            if self.jobs.share < 1:  # decode time pays off job time
                t0 = time.perf_counter()
                self._decode()
                self.jobs.paid(time.perf_counter() - t0)
            else:
                self._decode()
            self._reap()
        if sched.staged is not None:  # (after the decode: the running rows' tokens go out first)
            self._prefill_chunk()
            self._reap()

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, in batches of up to `prefill_tokens` padded tokens; while rows
        run and prompts are chunked, one batch of up to `prefill_chunk` tokens (or a prompt staged) per step."""
        sched = self.scheduler
        while sched.waiting and len(sched.running) < self.max_batch_size:
            chunking = sched.chunking
            batch, dropped = sched.admit()
            self.output.finish([(r, "abort", None) for r in dropped])
            if not batch:
                return
            self._prefill(batch)
            if chunking:
                return

    def _prefill(self, batch: list[Request]) -> None:
        self._prefill_started(batch)
        plan = BatchPlan.of(batch, self.device)
        row = len(self.scheduler.running)
        logits, dest, traces, norms = self.runner.prefill(batch, row, plan, self.observer.wants_resid_norms)
        self.scheduler.join(batch)
        self._prefilled(batch, norms)
        self._emit(batch, sample(logits, plan, dest), traces)

    def _prefill_chunk(self) -> None:
        """The staged request's next chunk; after its last, the request samples its first token and joins the
        running rows (its cache row, next token and position copied from the staging row to its row there)."""
        sched = self.scheduler
        chunk = sched.next_chunk()
        req = chunk.req
        if chunk.start == 0:
            self._prefill_started([req])
        logits, dest, traces, norms = self.runner.prefill_chunk(
            req, chunk.row, chunk.start, chunk.stop, chunk.plan, self.observer.wants_resid_norms
        )
        if not chunk.last:
            sched.chunk_done(chunk)
            return
        sampled = sample(logits, chunk.plan, dest)  # into the staging row's next-token slot
        row = sched.chunk_done(chunk)
        assert row is not None  # (the last chunk: the request joined the running rows)
        if row != chunk.row:
            self.runner.move_rows([(chunk.row, row)])
        self._prefilled([req], norms)
        self._emit([req], sampled, traces)

    def _prefill_started(self, batch: list[Request]) -> None:
        now = time.perf_counter()
        for req in batch:
            req.t_prefill = now
            self.observer.on_prefill(len(req.prompt), now - req.t_submit)

    def _prefilled(self, batch: list[Request], norms: list[list[float]] | None) -> None:
        observer = self.observer
        for row_norms in norms or ():
            observer.on_resid_norms(row_norms)
        for req in batch:
            if req.params.intervention is not None:
                observer.on_intervention(req.params.intervention.parts())
        self._report_queue()

    def _decode(self) -> None:
        batch = self.scheduler.running
        plan = self.scheduler.plan()
        logits, dest, traces = self.runner.decode(batch, plan)
        self.steps += 1
        self.observer.on_step(len(batch))
        self._emit(batch, sample(logits, plan, dest), traces)

    def _emit(self, batch: list[Request], sampled: Sampled, traces: Traces | None) -> None:
        if self.output.tokens(batch, sampled, traces):
            self.scheduler.mark_dirty()

    def _reap(self) -> None:
        """Remove ended requests (the runner moves the rows the scheduler says) and send their finish events."""
        if self._aborting:
            self.scheduler.cancel_all()
        reaped = self.scheduler.reap(time.perf_counter())
        if reaped.moves:
            self.runner.move_rows(reaped.moves)
        self._report_queue()  # the gauges move before any client can see its request end
        if not reaped.ended:
            return
        timeout = "request exceeded the per-request timeout"
        self.output.finish([(r, reason, timeout if reason == "timeout" else None) for r, reason in reaped.ended])

    def _report_queue(self) -> None:
        """Tell the observer the running / waiting counts when they changed since the worker last did (or a submit
        told it)."""
        counts = (self.n_running, self.n_waiting)
        if counts != self._reported:
            self._reported = counts
            self.observer.on_queue_change(*counts)
