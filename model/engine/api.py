"""What callers of the engine see: the request's parameters, its events, the handle, the observer and the errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from model.edits import Intervention

MAX_SEED = 2**63 - 1
MAX_LENS_TOP = 5  # logit-lens tokens per layer in a trace
LENSES = ("logit", "tuned")  # what a trace's lens tokens are read through (SamplingParams.lens)


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
        """The message, naming the new-token limit as the caller's API does. A prompt that alone fills the window
        is told so without naming the limit (the client may never have sent one: a default is capped to fit)."""
        if self.n_prompt >= self.window:
            return (
                f"prompt is {self.n_prompt} tokens (one token is one UTF-8 byte), which leaves no room for a new "
                f"token in the context window of {self.window} tokens; shorten it to at most {self.window - 1} bytes"
            )
        return (
            f"prompt ({self.n_prompt} tokens; one token is one UTF-8 byte) + {max_new_name} ({self.max_new_tokens}) "
            f"= {self.n_prompt + self.max_new_tokens} exceeds the context window of {self.window} tokens; "
            f"lower {max_new_name} to at most {self.window - self.n_prompt} or shorten the prompt"
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
    lens: str = "logit"  # which lens logit_lens_top reads: "logit" (ln_f, unembed) or "tuned" (model.lens first)
    # per token: these points of the stream (index 0: before block 0, l + 1: after block l), float32 (len, d_model)
    return_stream: tuple[int, ...] = ()

    @property
    def traced(self) -> bool:
        """Whether this request's tokens carry a trace."""
        return self.trace or self.logit_lens_top > 0

    @property
    def streamed(self) -> bool:
        """Whether the step returns this row's stream (for a trace, or its vectors)."""
        return self.traced or bool(self.return_stream)


@dataclass(slots=True)
class TokenEvent:
    """One generated token; `text` is the newly releasable text (may be '' while a stop string may be forming)."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    trace: dict[str, Any] | None = None  # the position that produced the token: see `stream_trace`
    stream: Any = None  # float32 tensor (len(return_stream), d_model): the stream at that position, when asked


@dataclass
class FinishEvent:
    """The end of a request, with its full result."""

    reason: str  # length | stop | abort | timeout | error | overflow (the consumer fell too far behind)
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


Event = TokenEvent | FinishEvent


class EventQueue(asyncio.Queue[Event]):
    """A request's events on their way to its consumer; knows when the consumer last took one (event-loop time)."""

    def __init__(self) -> None:
        super().__init__()
        self.taken_at = asyncio.get_running_loop().time()

    def get_nowait(self) -> Event:  # (`get` ends in it)
        ev = super().get_nowait()
        self.taken_at = asyncio.get_running_loop().time()
        return ev


class RequestHandle:
    """A submitted request: iterate it for events; `cancel()` makes it leave the batch within one step."""

    def __init__(self, request_id: int, seed: int, queue: asyncio.Queue[Event], cancel: Callable[[], None]) -> None:
        self.id, self.seed = request_id, seed
        self._queue, self._cancel = queue, cancel

    def cancel(self) -> None:
        """Ask the engine to drop this request (finish reason `abort`)."""
        self._cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            ev = await self._queue.get()
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
