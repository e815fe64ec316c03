"""Continuous-batching inference engine.

One worker thread owns the model. Waiting requests are prefilled into a free KV-cache row and
join the running batch; every step decodes one token for all running rows in one batched forward.
Finished or cancelled rows leave at once (the last row is moved into the hole, so live rows stay
contiguous and the cache view needs no gather). Tokens reach each request through its own asyncio
queue; the event loop never runs model code. No HTTP and no Prometheus here: an `EngineObserver`
receives the numbers.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from model import tokenizer
from model.diagnostics import residual_norms_last
from model.sampling import LogitControls, adjust_logits, control_problem, record_tokens, sample_rows, top_logprobs
from model.transformer import FastDecoder, KVCache, Transformer, auto_decode_weights

log = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1


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
        return (f"prompt ({self.n_prompt} tokens) + {max_new_name} ({self.max_new_tokens}) = "
                f"{self.n_prompt + self.max_new_tokens} exceeds the context window of {self.window} tokens")


class QueueFullError(EngineError):
    """The waiting queue is at its limit."""


class EngineDrainingError(EngineError):
    """The engine is draining or stopped and accepts no new work."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings."""

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


@dataclass
class TokenEvent:
    """One generated token; `text` is the newly releasable text (may be '' while a stop string may be forming)."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


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
    controls: LogitControls | None = None  # logit bias / penalty state; None when the request uses none
    decoder: tokenizer.IncrementalDecoder = field(default_factory=tokenizer.IncrementalDecoder)
    text: str = ""  # all decoded text so far
    emitted: int = 0  # characters of `text` already sent
    n_generated: int = 0
    pos: int = 0  # position of the next token to feed
    last_token: int = 0
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


def _release_len(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent: hold back a tail that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if s.startswith(text[-k:]):
                hold = k
                break
    return len(text) - hold


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
        self.cache = KVCache(self.config, max_batch_size, device=self.device, dtype=self.dtype)
        self.decode_weights = auto_decode_weights(self.device) if decode_weights == "auto" else decode_weights
        self.decode_step = FastDecoder(self.model, weights=self.decode_weights)  # the fast path; warm-up runs it too
        self._running: list[_Request] = []  # row i of the cache belongs to _running[i]
        self._waiting: collections.deque[_Request] = collections.deque()
        self._jobs: collections.deque[tuple[Generator, Future]] = collections.deque()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0

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
            id=next(self._ids), prompt=list(prompt), params=params, seed=seed, loop=loop,
            queue=asyncio.Queue(), t_submit=now,
            deadline=now + self.request_timeout_s if self.request_timeout_s else None,
            generator=torch.Generator().manual_seed(seed),
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
        return RequestHandle(req, self)

    def run_job(self, job: Callable[[Transformer], Generator[None, None, Any]]) -> Future:
        """Run `job(model)` on the worker between decode steps.

        The job is a generator function: it should yield after each forward pass, so running
        generation never stalls for more than one of its passes. Its return value resolves the future.
        """
        fut: Future = Future()
        with self._cv:
            if self._stop:
                raise EngineDrainingError("engine is stopped")
            self._jobs.append((job(self.model), fut))
            self._cv.notify_all()
        return fut

    def begin_drain(self) -> None:
        """Stop accepting new requests; running and waiting ones finish."""
        with self._cv:
            self._accepting = False
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
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, ev)
        except RuntimeError:  # the request's event loop is closed: nobody is listening
            req.cancelled = True

    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        while True:
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
        for req in list(self._running) + list(self._waiting):
            self._finish(req, "abort", error="engine stopped")
        self._running.clear()
        self._waiting.clear()
        while self._jobs:
            _, fut = self._jobs.popleft()
            fut.set_exception(EngineDrainingError("engine stopped"))

    def _step(self) -> None:
        self._run_job_slice()
        self._reap()
        self._admit()
        self._reap()  # a request can finish on its prefill token (max_new_tokens=1, stop): it must not decode again
        if self._running:
            self._decode()
            self._reap()

    def _run_job_slice(self) -> None:
        if not self._jobs:
            return
        gen, fut = self._jobs[0]
        try:
            next(gen)
        except StopIteration as stop:
            self._jobs.popleft()
            fut.set_result(stop.value)
        except Exception as e:  # noqa: BLE001 - delivered to the caller
            self._jobs.popleft()
            fut.set_exception(e)

    def _admit(self) -> None:
        """Move waiting requests into free rows, prefilling them together up to `prefill_tokens` padded tokens."""
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
        """One forward over the prompts of `batch`, right-padded to the longest, into the next free cache rows.

        Padding is exact: a causal model's outputs at real positions never see later (padded) ones, and the
        cache entries written at padded positions are overwritten by the row's decode steps before any
        query can attend to them (the decode mask covers keys up to each row's own position).
        """
        now = time.perf_counter()
        for req in batch:
            req.t_prefill = now
            self.observer.on_prefill(len(req.prompt), now - req.t_submit)
        n, width, row = len(batch), max(len(r.prompt) for r in batch), len(self._running)
        idx = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r in batch], device=self.device)  # (n, T)
        last = torch.tensor([len(r.prompt) - 1 for r in batch], device=self.device)  # (n,)
        want_norms = self.observer.wants_resid_norms
        out = self.model(
            idx, cache=self.cache.rows(row, row + n),
            pos=torch.zeros(n, dtype=torch.long, device=self.device), return_resid=want_norms, at=last,
        )
        if want_norms:
            for i in range(n):
                self.observer.on_resid_norms(residual_norms_last(out.resid, row=i))
        logits = out.logits[:, -1]  # (n, V)
        for req in batch:
            req.pos = len(req.prompt)
            self._running.append(req)
        self.observer.on_queue_change(len(self._running), len(self._waiting))
        self._sample_and_emit(batch, logits)

    def _decode(self) -> None:
        batch = self._running
        B = len(batch)
        tokens = torch.tensor([r.last_token for r in batch], device=self.device)  # (B,)
        pos = torch.tensor([r.pos for r in batch], device=self.device)  # (B,)
        logits = self.decode_step(tokens, self.cache.rows(0, B), pos)  # (B, V)
        for r in batch:
            r.pos += 1
        self.steps += 1
        self.observer.on_step(B)
        self._sample_and_emit(batch, logits)

    def _sample_and_emit(self, batch: list[_Request], logits: torch.Tensor) -> None:
        now = time.perf_counter()
        controls = [r.controls for r in batch]
        adjusted = adjust_logits(logits, controls)  # logit bias and penalties; logprobs stay the model's (raw)
        if all(r.params.temperature == 0 for r in batch):
            chosen = adjusted.argmax(dim=-1)  # (B,) all greedy: nothing to draw
        else:
            temp = torch.tensor([r.params.temperature for r in batch], device=self.device)
            top_k = torch.tensor([r.params.top_k for r in batch], device=self.device)
            top_p = torch.tensor([r.params.top_p for r in batch], device=self.device)
            min_p = (torch.tensor([r.params.min_p for r in batch], device=self.device)
                     if any(r.params.min_p > 0 for r in batch) else None)
            chosen = sample_rows(adjusted, temp, top_k, top_p, [r.generator for r in batch], min_p)  # (B,)
        n_lp = max(r.params.logprobs for r in batch)
        lp = top_logprobs(logits, chosen, n_lp) if n_lp > 0 else None
        chosen_list = chosen.tolist()
        record_tokens(controls, chosen_list)
        lp_lists = [t.tolist() for t in lp] if lp is not None else None
        gaps = []
        for i, (r, tok) in enumerate(zip(batch, chosen_list, strict=True)):
            r.last_token, r.n_generated = tok, r.n_generated + 1
            if r.t_first is None:
                r.t_first = now
                self.observer.on_first_token(now - r.t_submit)
            else:
                gaps.append(now - r.t_last)
            r.t_last = now
            r.text += r.decoder.push(tok)
            ev = TokenEvent(token_id=tok, text="")
            if lp_lists is not None and r.params.logprobs > 0:
                ev.logprob = lp_lists[0][i]
                ev.top_logprobs = list(zip(lp_lists[2][i][: r.params.logprobs], lp_lists[1][i][: r.params.logprobs],
                                           strict=True))
            stop_at = self._find_stop(r)
            if stop_at is not None:
                r.text = r.text[:stop_at]
                ev.text = r.text[r.emitted :]
                r.emitted = len(r.text)
                self._emit(r, ev)
                r.finish_reason = "stop"
                continue
            if r.n_generated >= r.params.max_new_tokens:
                r.text += r.decoder.flush()
                ev.text = r.text[r.emitted :]
                r.emitted = len(r.text)
                self._emit(r, ev)
                r.finish_reason = "length"
                continue
            release = _release_len(r.text, r.params.stop) if r.params.stop else len(r.text)
            ev.text = r.text[r.emitted : release]
            r.emitted = max(r.emitted, release)
            self._emit(r, ev)
        if gaps:
            self.observer.on_tokens(gaps)

    @staticmethod
    def _find_stop(r: _Request) -> int | None:
        if not r.params.stop:
            return None
        # only the tail can contain a new match: look back over the longest stop string
        start = max(0, len(r.text) - max(len(s) for s in r.params.stop) - 4)
        hits = [i for s in r.params.stop if (i := r.text.find(s, start)) != -1]
        return min(hits) if hits else None

    def _reap(self) -> None:
        now = time.perf_counter()
        i = 0
        while i < len(self._running):
            r = self._running[i]
            reason = r.finish_reason
            if reason is None and r.cancelled:
                reason = "abort"
            if reason is None and r.deadline is not None and now > r.deadline:
                reason = "timeout"
            if reason is None:
                i += 1
                continue
            last = len(self._running) - 1
            if i != last:  # keep live rows contiguous: move the last row into the hole
                self.cache.copy_row(last, i)
                self._running[i] = self._running[last]
            self._running.pop()
            err = "request exceeded the per-request timeout" if reason == "timeout" else None
            self._finish(r, reason, error=err)
        with self._cv:
            expired = [r for r in self._waiting if r.cancelled or (r.deadline is not None and now > r.deadline)]
            for r in expired:
                self._waiting.remove(r)
        for r in expired:
            reason = "abort" if r.cancelled else "timeout"
            self._finish(r, reason, error="request exceeded the per-request timeout" if reason == "timeout" else None)
        self.observer.on_queue_change(len(self._running), len(self._waiting))

    def _finish(self, r: _Request, reason: str, error: str | None = None) -> None:
        now = time.perf_counter()
        timings = {
            "queue_s": (r.t_prefill - r.t_submit) if r.t_prefill else now - r.t_submit,
            "ttft_s": (r.t_first - r.t_submit) if r.t_first else None,
            "total_s": now - r.t_submit,
        }
        self.observer.on_finish(reason, now - r.t_submit, r.n_generated)
        self._emit(r, FinishEvent(reason=reason, text=r.text, prompt_tokens=len(r.prompt),
                                  completion_tokens=r.n_generated, seed=r.seed, timings=timings, error=error))
