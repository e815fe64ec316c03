"""Continuous-batching inference engine.

One worker thread owns the model. Waiting requests are prefilled into a free KV-cache row and
join the running batch; every step decodes one token for all running rows in one batched forward.
Finished or cancelled rows leave at once (a live row from the end is moved into each hole, so live rows
stay contiguous and the cache view needs no gather). Tokens reach each request through its own asyncio
queue, every row's token of a step with one wake-up of the event loop; the event loop never runs model
code. No HTTP and no Prometheus here: an `EngineObserver` receives the numbers.

A step does little in Python besides the decode call: the rows' next tokens and positions stay in tensors
updated in place, what the batch asks for (interventions, traces, logit controls, sampling, logprobs) is
worked out when its rows change, and a steady batch (no job, no waiting request, no row that may have
ended) goes straight to its decode.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

import torch

from model import tokenizer
from model.decode import auto_decode_weights
from model.diagnostics import stream_norms, stream_trace
from model.edits import Intervention, StreamEdits
from model.fast import FusedDecoder, auto_kv_dtype, make_decoder
from model.kv_cache import KVCache
from model.sampling import LogitControls, adjust_logits, control_problem, record_tokens, sample_rows, top_logprobs
from model.textstream import TextStream
from model.transformer import Transformer

log = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
MAX_LENS_TOP = 5  # logit-lens tokens per layer in a trace
KV_CACHE_DTYPES = ("auto", "float32", "float16")


class EngineError(Exception):
    """Base class of errors raised to callers of the engine."""


class InvalidRequestError(EngineError, ValueError):
    """A request parameter is out of range; `param` names it (a SamplingParams field, or "prompt")."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """Prompt tokens + max_new_tokens exceed the context window."""

    def __init__(self, n_prompt: int, max_new_tokens: int, window: int) -> None:
        self.n_prompt, self.max_new_tokens, self.window = n_prompt, max_new_tokens, window
        # the prompt is to blame when it leaves no room for even one new token
        super().__init__(self.describe(), "prompt" if n_prompt >= window else "max_new_tokens")

    def describe(self, max_new_name: str = "max_new_tokens") -> str:
        """The message, naming the new-token limit as the caller's API does."""
        return (
            f"prompt ({self.n_prompt} tokens) + {max_new_name} ({self.max_new_tokens}) = "
            f"{self.n_prompt + self.max_new_tokens} exceeds the context window of {self.window} tokens"
        )


class QueueFullError(EngineError):
    """The waiting queue is at its limit."""


class EngineDrainingError(EngineError):
    """The engine is draining or stopped and accepts no new work."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, including what to change in and report from the residual stream."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int = 0
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens; 0 = off
    frequency_penalty: float = 0.0  # OpenAI's, over generated tokens; 0 = off
    repetition_penalty: float = 1.0  # CTRL / HF, over prompt and generated tokens; 1 = off
    min_p: float = 0.0  # 0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs; biases clamped to +-100
    intervention: Intervention | None = None  # applied to this request's prefill and every decode step
    trace: bool = False  # per token: resid_post norm and block update ratio of every layer
    logit_lens_top: int = 0  # per token and layer: the logit lens's top-K tokens (implies trace)

    @property
    def traced(self) -> bool:
        """Whether this request's tokens carry a trace."""
        return self.trace or self.logit_lens_top > 0


@dataclass(slots=True)
class TokenEvent:
    """One generated token; `text` is the newly releasable text (may be '' while a stop string may be forming)."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    trace: dict[str, Any] | None = None  # the position that produced the token: see `stream_trace`


@dataclass
class FinishEvent:
    """The end of a request, with its full result."""

    reason: str  # length | stop | abort | timeout | error
    text: str
    prompt_tokens: int
    completion_tokens: int
    seed: int
    timings: dict[str, float | None]
    error: str | None = None


class EngineObserver:
    """Receives engine measurements (the app maps them to metrics). Methods run on the worker thread."""

    wants_resid_norms = False

    def on_prefill(self, prompt_tokens: int, queue_time_s: float) -> None:
        """A request left the queue and was prefilled."""

    def on_first_token(self, ttft_s: float) -> None:
        """A request produced its first token."""

    def on_tokens(self, inter_token_s: list[float]) -> None:
        """Inter-token latencies of the tokens produced in one decode step."""

    def on_step(self, batch_size: int) -> None:
        """One batched decode step ran with `batch_size` sequences."""

    def on_finish(self, reason: str, e2e_s: float, completion_tokens: int) -> None:
        """A request finished."""

    def on_queue_change(self, running: int, waiting: int) -> None:
        """The number of running / waiting requests changed."""

    def on_resid_norms(self, norms: list[float]) -> None:
        """Last-position resid_post L2 norm per layer of a served prefill."""

    def on_intervention(self, parts: set[str]) -> None:
        """A request with an intervention on these parts (block, attn, mlp) was prefilled."""


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    t_submit: float
    deadline: float | None
    generator: torch.Generator
    edits: StreamEdits | None  # what the request does to the residual stream (compiled at submit), None = nothing
    text: TextStream
    controls: LogitControls | None  # logit bias / penalty state; None when the request uses none
    n_generated: int = 0  # its last token is fed at position len(prompt) + n_generated - 1
    cancelled: bool = False
    finish_reason: str | None = None  # set when the sequence ends by stop string or length
    t_prefill: float | None = None
    t_first: float | None = None
    t_last: float | None = None


class RequestHandle:
    """A submitted request: iterate it for events; `cancel()` makes it leave the batch within one step."""

    def __init__(self, req: _Request, engine: Engine) -> None:
        self._req, self._engine = req, engine
        self.id, self.seed = req.id, req.seed

    def cancel(self) -> None:
        """Ask the engine to drop this request (finish reason `abort`)."""
        self._req.cancelled = True
        self._engine._dirty = True  # after `cancelled`: the worker's next reap looks at every row
        self._engine._wake()

    async def __aiter__(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        while True:
            ev = await self._req.queue.get()
            yield ev
            if isinstance(ev, FinishEvent):
                return

    async def result(self) -> tuple[list[TokenEvent], FinishEvent]:
        """Wait for the end; return every token event and the finish event."""
        tokens: list[TokenEvent] = []
        async for ev in self:
            if isinstance(ev, FinishEvent):
                return tokens, ev
            tokens.append(ev)
        raise RuntimeError("unreachable")


@dataclass(slots=True)
class _Plan:
    """What a batch of rows asks of each step beyond greedy decoding, worked out when its rows change (admission,
    leaving) rather than every step. In the common case every field is empty: no gates, no trace, no controls,
    all greedy, no logprobs."""

    edits: StreamEdits | None  # one row per row of the batch, None when no row has edits
    traced: list[int]  # rows whose tokens carry a trace
    trace_rows: torch.Tensor | None  # the same as a tensor, None when no row is traced
    controls: list[LogitControls | None] | None  # per row, None when no row uses a logit control
    # (temperature, top_k, top_p, generators, min_p) for sample_rows, None when every row is greedy
    sampling: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Generator], torch.Tensor | None] | None
    n_logprobs: int  # the most logprobs any row asks for
    deadline: float  # the earliest deadline of the rows (inf: none has one)


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
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.request_timeout_s = request_timeout_s
        self.max_stop_strings, self.max_stop_length, self.max_logprobs = max_stop_strings, max_stop_length, max_logprobs
        self.prefill_tokens = prefill_tokens  # padded prompt tokens per batched prefill (bounds the decode stall)
        self.observer = observer or EngineObserver()
        self.decode_weights = auto_decode_weights(self.device) if decode_weights == "auto" else decode_weights
        # the fast path (warm-up runs it too): the fused C step where it is built, else TorchScript (model/fast)
        self.decode_step = make_decoder(self.model, self.decode_weights, decode_backend)
        self.decode_backend = "fused" if isinstance(self.decode_step, FusedDecoder) else "torchscript"
        self.kv_cache_dtype = self._kv_dtype(kv_cache_dtype)
        self.cache = KVCache(self.config, max_batch_size, device=self.device, dtype=self.kv_cache_dtype)
        self._running: list[_Request] = []  # row i of the cache belongs to _running[i]
        self._waiting: collections.deque[_Request] = collections.deque()
        self._jobs: collections.deque[tuple[Generator, Future]] = collections.deque()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._accepting = True
        self._stop = False
        self._aborting = False  # drain deadline passed: end everything within one step
        self.job_share = job_share  # most of the worker's time jobs take while sequences decode
        self._job_debt = 0.0  # job seconds not yet matched by decode time (see _run_job_slice)
        self._thread: threading.Thread | None = None
        self.steps = 0
        # per-step state kept between steps: the rows' next tokens and positions (updated in place), the step's
        # views of them and of the cache per batch size, the running batch's plan (None: to work out again), whether
        # a row may have ended (finished, cancelled, loop closed), and the last queue sizes told to the observer
        self._tokens = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._views: dict[int, tuple[KVCache, torch.Tensor, torch.Tensor, KVCache]] = {}
        self._plan: _Plan | None = None
        self._dirty = False
        self._reported: tuple[int, int] | None = None

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

    @property
    def n_running(self) -> int:
        """Sequences in the running batch."""
        return len(self._running)

    @property
    def n_waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    @property
    def n_jobs(self) -> int:
        """Jobs (e.g. diagnostics) queued or running on the worker."""
        return len(self._jobs)

    @property
    def accepting(self) -> bool:
        """False once draining or stopped."""
        return self._accepting

    def warm_up(self, rows: int = 4, steps: int = 3) -> None:
        """Run a prefill and a few decode steps (plain, then gated and traced) off the worker, before `start`,
        so first requests skip lazy initialisation (TorchScript specialises a step on its first calls)."""
        if self._thread is not None:
            raise RuntimeError("warm up before start: the worker owns the cache")
        rows = min(rows, self.max_batch_size)
        cache = self.cache.rows(0, rows)
        prompt = torch.tensor([tokenizer.encode("Warm up.")] * rows, device=self.device)  # (R, T)
        edits = Intervention().compile(self.config.n_layer, self.device).expand(rows)  # the identity, edited path
        with torch.inference_mode():
            self.model(prompt, cache=cache, pos=torch.zeros(rows, dtype=torch.long, device=self.device), last_only=True)
            pos = torch.full((rows,), prompt.shape[1], device=self.device)
            for extra in ({}, {"edits": edits, "trace_rows": torch.arange(rows, device=self.device)}):
                for _ in range(steps):
                    self.decode_step(prompt[:, 0], cache, pos, **extra)  # (R, V)
                    pos = pos + 1

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError / PromptTooLongError for a request the engine cannot serve."""
        if not prompt:
            raise InvalidRequestError("prompt must contain at least one token", "prompt")
        if any(not 0 <= t < self.config.vocab_size for t in prompt):
            raise InvalidRequestError(f"token ids must be in 0..{self.config.vocab_size - 1}", "prompt")
        if params.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be at least 1", "max_new_tokens")
        if not (params.temperature >= 0 and params.temperature != float("inf")):
            raise InvalidRequestError("temperature must be a finite number >= 0", "temperature")
        if params.top_k < 0:
            raise InvalidRequestError("top_k must be >= 0 (0 disables it)", "top_k")
        if not 0 < params.top_p <= 1:
            raise InvalidRequestError("top_p must be in (0, 1]", "top_p")
        if not 0 <= params.logprobs <= self.max_logprobs:
            raise InvalidRequestError(f"logprobs must be in 0..{self.max_logprobs}", "logprobs")
        if len(params.stop) > self.max_stop_strings:
            raise InvalidRequestError(f"at most {self.max_stop_strings} stop strings are allowed", "stop")
        if any(not s or len(s) > self.max_stop_length for s in params.stop):
            raise InvalidRequestError(f"stop strings must be 1..{self.max_stop_length} characters", "stop")
        if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
            raise InvalidRequestError(f"seed must be in 0..{MAX_SEED}", "seed")
        if (problem := control_problem(params, self.config.vocab_size)) is not None:
            raise InvalidRequestError(*problem)
        if not 0 <= params.logit_lens_top <= MAX_LENS_TOP:
            raise InvalidRequestError(f"logit_lens_top must be in 0..{MAX_LENS_TOP}", "logit_lens_top")
        problem = params.intervention.problem(self.config.n_layer) if params.intervention else None
        if problem is not None:
            raise InvalidRequestError(problem[1], problem[0])
        window = self.config.block_size
        if len(prompt) + params.max_new_tokens > window:
            raise PromptTooLongError(len(prompt), params.max_new_tokens, window)

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request (call from the event loop); raise on invalid input, a full queue or draining."""
        self.validate(prompt, params)
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        req = _Request(
            id=next(self._ids),
            prompt=list(prompt),
            params=params,
            seed=seed,
            loop=loop,
            queue=asyncio.Queue(),
            t_submit=now,
            deadline=now + self.request_timeout_s if self.request_timeout_s else None,
            generator=torch.Generator().manual_seed(seed),
            text=TextStream(params.stop),
            edits=params.intervention.compile(self.config.n_layer, self.device) if params.intervention else None,
            controls=LogitControls.create(list(prompt), params, self.config.vocab_size, self.device),
        )
        with self._cv:
            if not self._accepting:
                raise EngineDrainingError("server is shutting down and accepts no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(req)
            self._cv.notify_all()
        self.observer.on_queue_change(len(self._running), len(self._waiting))
        self._reported = None  # the worker may have reported in between: it reports again at its next reap
        return RequestHandle(req, self)

    def run_job(self, job: Callable[[Transformer], Generator[None, None, Any]]) -> Future:
        """Run `job(model)` on the worker between decode steps.

        The job is a generator function: it should yield after each forward pass, so running
        generation never stalls for more than one of its passes. Its return value resolves the future;
        cancelling the future (caller timed out or left) drops the job before its next slice. While
        sequences decode, jobs get at most `job_share` of the worker's time (one slice, then decode
        steps until decoding has had its share).
        """
        fut: Future = Future()
        with self._cv:
            if self._stop or not self._accepting:
                raise EngineDrainingError("server is shutting down and accepts no new requests")
            self._jobs.append((job(self.model), fut))
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
        while self._running or self._waiting or self._jobs:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.02)
        return True

    # ---- worker side ---------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _emit(self, req: _Request, ev: TokenEvent | FinishEvent) -> None:
        self._emit_all([(req, ev)])

    def _emit_all(self, events: list[tuple[_Request, TokenEvent | FinishEvent]]) -> None:
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
                loop.call_soon_threadsafe(_deliver, group)
            except RuntimeError:  # the event loop is closed: nobody is listening
                for r, _ in group:
                    r.cancelled = True
                self._dirty = True

    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            if not self._running:  # (rows decoding are work enough: no need to take the lock to look for more)
                with self._cv:
                    while not (self._stop or self._running or self._waiting or self._jobs):
                        self._cv.wait()
            if self._stop:
                break
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a bug must fail the requests, not kill the worker silently
                log.exception("engine step failed")
                for req in list(self._running) + list(self._waiting):
                    self._finish(req, "error", error=f"internal engine error: {type(e).__name__}")
                with self._cv:
                    self._running.clear()
                    self._waiting.clear()
                self._plan = None
                self._report_queue()
        for req in list(self._running) + list(self._waiting):
            self._finish(req, "abort", error="engine stopped")
        self._running.clear()
        self._waiting.clear()
        self._plan = None
        self._fail_jobs("engine stopped")

    def _fail_jobs(self, message: str) -> None:
        while self._jobs:
            gen, fut = self._jobs.popleft()
            gen.close()
            _resolve(fut, error=EngineDrainingError(message))

    def _step(self) -> None:
        plan = self._plan
        if (
            plan is None
            or self._jobs
            or self._waiting
            or self._aborting
            or self._dirty
            or not self._running
            or time.perf_counter() > plan.deadline
        ):  # else the steady state: no job to run, no request to admit, no row that may have ended (what these find)
            self._run_job_slice()
            self._reap()
            self._admit()
            self._reap()  # a request can finish on its prefill token (max_new_tokens=1, stop): it must not decode again
        if self._running:
            if self.job_share < 1:  # decode time pays off job time at share / (1 - share)
                t0 = time.perf_counter()
                self._decode()
                credit = (time.perf_counter() - t0) * self.job_share / (1 - self.job_share)
                self._job_debt = max(0.0, self._job_debt - credit)
            else:
                self._decode()
            self._reap()

    def _run_job_slice(self) -> None:
        """One slice (up to the job's next yield) of the oldest job; none while decoding is owed time."""
        if self._aborting:
            self._fail_jobs("server is shutting down: the drain timeout passed")
        while self._jobs and self._jobs[0][1].done():  # cancelled by its caller (timeout, disconnect)
            self._jobs.popleft()[0].close()
        if not self._running:
            self._job_debt = 0.0  # nothing decodes: jobs may use the whole worker
        if not self._jobs or (self._running and self._job_debt > 0):
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
        if self._running and self.job_share < 1:
            self._job_debt += time.perf_counter() - t0

    def _admit(self) -> None:
        """Move waiting requests into free rows, prefilling them together up to `prefill_tokens` padded tokens."""
        if not self._waiting:  # (a request queued just after this look is admitted at the next step)
            return
        while len(self._running) < self.max_batch_size:
            batch: list[_Request] = []
            width = 0  # longest prompt in the batch
            while len(self._running) + len(batch) < self.max_batch_size:
                with self._cv:
                    if not self._waiting:
                        break
                    req = self._waiting[0]
                    if batch and max(width, len(req.prompt)) * (len(batch) + 1) > self.prefill_tokens:
                        break
                    self._waiting.popleft()
                if req.cancelled:
                    self._finish(req, "abort")
                    continue
                batch.append(req)
                width = max(width, len(req.prompt))
            if not batch:
                return
            self._prefill(batch)

    def _prefill(self, batch: list[_Request]) -> None:
        """The prompts of `batch` into the next free cache rows: one call per prompt through the fused step's
        kernels where the engine decodes with them, else one forward right-padded to the longest.

        Padding is exact: a causal model's outputs at real positions never see later (padded) ones, and the
        cache entries written at padded positions are overwritten by the row's decode steps before any
        query can attend to them (the decode mask covers keys up to each row's own position).
        """
        now = time.perf_counter()
        for req in batch:
            req.t_prefill = now
            self.observer.on_prefill(len(req.prompt), now - req.t_submit)
        want_norms = self.observer.wants_resid_norms
        plan = self._plan_of(batch)
        traced = plan.traced
        n, row = len(batch), len(self._running)
        if isinstance(self.decode_step, FusedDecoder):
            logits, stream = self._prefill_fused(batch, want_norms or bool(traced))
        else:
            logits, stream = self._prefill_forward(batch, want_norms or bool(traced), plan.edits)
        if want_norms:  # stream: (L + 1, n, C), the last prompt position of every row
            for norms in stream_norms(stream)[1:].T.tolist():  # per row: |resid_post| of every layer
                self.observer.on_resid_norms(norms)
        traces = None
        if traced:
            traces = self._traces(batch, traced, stream[:, traced], [len(r.prompt) - 1 for r in batch])
        self._positions[row : row + n] = torch.tensor([len(r.prompt) for r in batch])  # where each next token goes
        for req in batch:
            self._running.append(req)
            if req.params.intervention is not None:
                self.observer.on_intervention(req.params.intervention.parts())
        self._plan = None
        self._report_queue()
        self._sample_and_emit(batch, logits, plan, self._tokens[row : row + n], traces)

    def _prefill_forward(
        self, batch: list[_Request], streams: bool, edits: StreamEdits | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompts through the reference forward in one batch, right-padded: (logits (n, V) at each row's last
        prompt position, its stream (L + 1, n, C) if `streams`)."""
        n, width, row = len(batch), max(len(r.prompt) for r in batch), len(self._running)
        idx = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r in batch], device=self.device)  # (n, T)
        last = torch.tensor([len(r.prompt) - 1 for r in batch], device=self.device)  # (n,)
        out = self.model(
            idx,
            cache=self.cache.rows(row, row + n),
            pos=torch.zeros(n, dtype=torch.long, device=self.device),
            return_resid=streams,
            at=last,
            edits=edits,
        )
        stream = None
        if streams:
            stream = torch.stack([out.resid[0]["resid_pre"][:, 0]] + [r["resid_post"][:, 0] for r in out.resid])
        return out.logits[:, -1], stream

    def _prefill_fused(self, batch: list[_Request], streams: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each prompt through the fused step's kernels (`FusedDecoder.prefill`): the same as `_prefill_forward`
        with the numbers of the decode step (its weights), and no padding."""
        step = self.decode_step
        assert isinstance(step, FusedDecoder)
        row = len(self._running)
        outs = [
            step.prefill(torch.tensor(r.prompt), self.cache.rows(row + i, row + i + 1), r.edits, trace=streams)
            for i, r in enumerate(batch)
        ]
        logits = torch.cat([o.logits for o in outs])  # (n, V)
        return logits, torch.cat([o.stream for o in outs], dim=1) if streams else None  # (L + 1, n, C)

    def _plan_of(self, batch: list[_Request]) -> _Plan:
        """What `batch` asks of a step (see `_Plan`)."""
        traced = [i for i, r in enumerate(batch) if r.params.traced]
        controls: list[LogitControls | None] | None = [r.controls for r in batch]
        if all(c is None for c in controls):
            controls = None
        sampling = None
        if not all(r.params.temperature == 0 for r in batch):
            dev = self.device
            sampling = (
                torch.tensor([r.params.temperature for r in batch], device=dev),
                torch.tensor([r.params.top_k for r in batch], device=dev),
                torch.tensor([r.params.top_p for r in batch], device=dev),
                [r.generator for r in batch],
                torch.tensor([r.params.min_p for r in batch], device=dev)
                if any(r.params.min_p > 0 for r in batch)
                else None,
            )
        return _Plan(
            edits=StreamEdits.stack([r.edits for r in batch]),
            traced=traced,
            trace_rows=torch.tensor(traced, device=self.device) if traced else None,
            controls=controls,
            sampling=sampling,
            n_logprobs=max((r.params.logprobs for r in batch), default=0),
            deadline=min((r.deadline for r in batch if r.deadline is not None), default=math.inf),
        )

    def _running_plan(self) -> _Plan:
        """The running batch's plan, worked out again after its rows changed."""
        if self._plan is None:
            self._plan = self._plan_of(self._running)
        return self._plan

    def _step_views(self, B: int) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """The first B rows' next tokens, positions and cache, as views made once per batch size."""
        views = self._views.get(B)
        if views is None or views[0] is not self.cache:
            views = self._views[B] = (self.cache, self._tokens[:B], self._positions[:B], self.cache.rows(0, B))
        return views[1], views[2], views[3]

    def _traces(
        self, batch: list[_Request], traced: list[int], stream: torch.Tensor, positions: list[int]
    ) -> list[dict[str, Any] | None]:
        """Per row of the batch, the trace of the position that produced its next token (None if not asked).

        `stream` (L + 1, R, C) holds the traced rows' embedding and resid_post of every layer at `positions`.
        """
        per_row = stream_trace(self.model, stream, [batch[i].params.logit_lens_top for i in traced])
        out: list[dict[str, Any] | None] = [None] * len(batch)
        for i, t in zip(traced, per_row, strict=True):
            out[i] = {"position": positions[i], **t}
        return out

    def _decode(self) -> None:
        batch = self._running
        B = len(batch)
        plan = self._running_plan()
        tokens, pos, cache = self._step_views(B)  # (B,), (B,): each row's last token and its position
        logits, stream = self.decode_step(tokens, cache, pos, plan.edits, plan.trace_rows)  # (B, V)
        traces = None
        if stream is not None:
            positions = [len(r.prompt) + r.n_generated - 1 for r in batch]
            traces = self._traces(batch, plan.traced, stream, positions)
        pos += 1  # in place: the next tokens go one further
        self.steps += 1
        self.observer.on_step(B)
        self._sample_and_emit(batch, logits, plan, tokens, traces)

    def _sample_and_emit(
        self,
        batch: list[_Request],
        logits: torch.Tensor,
        plan: _Plan,
        dest: torch.Tensor,
        traces: list[dict[str, Any] | None] | None = None,
    ) -> None:
        """Pick each row's next token from `logits` (B, V) into `dest` (B,) (the rows' slots of the next tokens fed
        to the step) and send it out."""
        now = time.perf_counter()
        controls = plan.controls
        # logit bias and penalties; logprobs stay the model's (raw)
        adjusted = adjust_logits(logits, controls) if controls is not None else logits
        if plan.sampling is None:  # all greedy: nothing to draw
            chosen = torch.argmax(adjusted, dim=-1, out=dest)  # (B,)
        else:
            chosen = dest.copy_(sample_rows(adjusted, *plan.sampling))  # (B,)
        lp = top_logprobs(logits, chosen, plan.n_logprobs) if plan.n_logprobs > 0 else None
        chosen_list = chosen.tolist()
        if controls is not None:
            record_tokens(controls, chosen_list)
        lp_lists = [t.tolist() for t in lp] if lp is not None else None
        observer = self.observer
        gaps = []
        events: list[tuple[_Request, TokenEvent | FinishEvent]] = []
        for i, (r, tok) in enumerate(zip(batch, chosen_list, strict=True)):
            n = r.n_generated = r.n_generated + 1
            if r.t_first is None:
                r.t_first = now
                observer.on_first_token(now - r.t_submit)
            else:
                gaps.append(now - r.t_last)
            r.t_last = now
            last = n >= r.params.max_new_tokens
            text, stopped = r.text.push(tok, last)
            ev = TokenEvent(tok, text, None, None, traces[i] if traces is not None else None)
            if lp_lists is not None and (k := r.params.logprobs) > 0:
                ev.logprob = lp_lists[0][i]
                ev.top_logprobs = list(zip(lp_lists[2][i][:k], lp_lists[1][i][:k], strict=True))
            events.append((r, ev))
            if stopped or last:
                r.finish_reason = "stop" if stopped else "length"
                self._dirty = True
        self._emit_all(events)
        if gaps:
            observer.on_tokens(gaps)

    def _reap(self) -> None:
        """Remove finished, cancelled and timed-out requests (running or waiting) and send their finish events."""
        now = time.perf_counter()
        if self._aborting:
            with self._cv:
                for r in itertools.chain(self._running, self._waiting):
                    r.cancelled = True
            self._dirty = True
        done: list[tuple[_Request, str]] = []
        # the rows are looked at only when one may have ended: a token finished it, it was cancelled, or a deadline
        # passed (cleared before looking: a cancel that comes during the look is seen now or at the next reap)
        if self._dirty or now > self._running_plan().deadline:
            self._dirty = False
            ended: list[int] = []
            for i, r in enumerate(self._running):
                reason = r.finish_reason
                if reason is None and r.cancelled:
                    reason = "abort"
                if reason is None and r.deadline is not None and now > r.deadline:
                    reason = "timeout"
                if reason is not None:
                    ended.append(i)
                    done.append((r, reason))
            if ended:
                self._remove_rows(ended)
        if self._waiting:
            with self._cv:
                expired = [r for r in self._waiting if r.cancelled or (r.deadline is not None and now > r.deadline)]
                for r in expired:
                    self._waiting.remove(r)
            done += [(r, "abort" if r.cancelled else "timeout") for r in expired]
        # the gauges move before any client can see its request end
        self._report_queue()
        if not done:
            return
        timeout = "request exceeded the per-request timeout"
        self._emit_all(
            [(r, self._finish_event(r, reason, timeout if reason == "timeout" else None)) for r, reason in done]
        )

    def _remove_rows(self, ended: list[int]) -> None:
        """Drop rows `ended` (ascending) of the running batch, keeping live rows contiguous: each hole below the new
        size takes one of the live rows above it (its cache, next token and position); ended rows are never moved."""
        running = self._running
        keep = len(running) - len(ended)
        gone = set(ended)
        holes = [i for i in ended if i < keep]
        movers = [j for j in range(keep, len(running)) if j not in gone]
        for dst, src in zip(holes, movers, strict=True):
            self.cache.copy_row(src, dst)
            self._tokens[dst] = self._tokens[src]
            self._positions[dst] = self._positions[src]
            running[dst] = running[src]
        del running[keep:]
        self._plan = None

    def _report_queue(self) -> None:
        """Tell the observer the running / waiting counts when they changed since the worker last did (or a
        submit told it)."""
        counts = (len(self._running), len(self._waiting))
        if counts != self._reported:
            self._reported = counts
            self.observer.on_queue_change(*counts)

    def _finish(self, r: _Request, reason: str, error: str | None = None) -> None:
        self._emit(r, self._finish_event(r, reason, error))

    def _finish_event(self, r: _Request, reason: str, error: str | None = None) -> FinishEvent:
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


def _deliver(events: list[tuple[_Request, TokenEvent | FinishEvent]]) -> None:
    """On the requests' event loop: put each event on its request's queue."""
    for r, ev in events:
        r.queue.put_nowait(ev)


def _resolve(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Settle a job's future, unless its caller already cancelled it (setting it then would raise in the worker)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
