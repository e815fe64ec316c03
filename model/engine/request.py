"""One request's state inside the engine (a row of the batch once admitted), and the check it passes at submit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.edits import StreamEdits
from model.engine.api import (
    LENSES,
    MAX_LENS_TOP,
    MAX_SEED,
    Event,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
)
from model.sampling import LogitControls, control_problem
from model.textstream import TextStream


@dataclass
class Request:
    """A submitted request: what it asked (compiled once, at submit), where its events go, and how far it got."""

    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event]
    t_submit: float
    deadline: float | None
    generator: torch.Generator
    edits: StreamEdits | None  # what the request does to the residual stream (one row), None = nothing
    text: TextStream
    controls: LogitControls | None  # logit bias / penalty state; None when the request uses none
    n_generated: int = 0  # its last token is fed at position len(prompt) + n_generated - 1
    cancelled: bool = False
    finish_reason: str | None = None  # set when the sequence ends by stop string or length
    t_prefill: float | None = None
    t_first: float | None = None
    t_last: float | None = None
    group: object = None  # the requests (rows) of one client request share it: admission is fair between groups
    max_pending: int = 0  # most events waiting on `queue` (0: no limit); past it the request is cancelled
    overflowed: bool = False  # its consumer fell `max_pending` events behind: it got its finish event already

    @property
    def position(self) -> int:
        """The position of the token this row feeds to its next step (the one that produced its last token)."""
        return len(self.prompt) + self.n_generated - 1


@dataclass(frozen=True)
class Limits:
    """What the engine serves: the request-size settings and the model's shape."""

    config: ModelConfig
    max_stop_strings: int = 16
    max_stop_length: int = 64
    max_logprobs: int = 20
    no_tuned_lens: str | None = None  # the answer to lens="tuned" when the model has no tuned lens; None: it has one


def check_request(prompt: list[int], params: SamplingParams, limits: Limits) -> None:
    """Raise InvalidRequestError / PromptTooLongError for a request the engine cannot serve."""
    config = limits.config
    if not prompt:
        raise InvalidRequestError("prompt must contain at least one token", "prompt")
    if any(not 0 <= t < config.vocab_size for t in prompt):
        raise InvalidRequestError(f"token ids must be in 0..{config.vocab_size - 1}", "prompt")
    if params.max_new_tokens < 1:
        raise InvalidRequestError("max_new_tokens must be at least 1", "max_new_tokens")
    if not (params.temperature >= 0 and params.temperature != float("inf")):
        raise InvalidRequestError("temperature must be a finite number >= 0", "temperature")
    if params.top_k < 0:
        raise InvalidRequestError("top_k must be >= 0 (0 disables it)", "top_k")
    if not 0 < params.top_p <= 1:
        raise InvalidRequestError("top_p must be in (0, 1]", "top_p")
    if not 0 <= params.logprobs <= limits.max_logprobs:
        raise InvalidRequestError(f"logprobs must be in 0..{limits.max_logprobs}", "logprobs")
    if len(params.stop) > limits.max_stop_strings:
        raise InvalidRequestError(f"at most {limits.max_stop_strings} stop strings are allowed", "stop")
    if any(not s or len(s) > limits.max_stop_length for s in params.stop):
        raise InvalidRequestError(f"stop strings must be 1..{limits.max_stop_length} characters", "stop")
    if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
        raise InvalidRequestError(f"seed must be in 0..{MAX_SEED}", "seed")
    if (problem := control_problem(params, config.vocab_size)) is not None:
        raise InvalidRequestError(*problem)
    if not 0 <= params.logit_lens_top <= MAX_LENS_TOP:
        raise InvalidRequestError(f"logit_lens_top must be in 0..{MAX_LENS_TOP}", "logit_lens_top")
    if params.lens not in LENSES:
        raise InvalidRequestError(f"lens must be one of {', '.join(LENSES)}, not {params.lens!r}", "lens")
    if params.lens == "tuned" and limits.no_tuned_lens is not None:
        raise InvalidRequestError(limits.no_tuned_lens, "lens")
    if any(not 0 <= i <= config.n_layer for i in params.return_stream):
        raise InvalidRequestError(f"return_stream holds points 0..{config.n_layer} of the stream", "return_stream")
    problem = params.intervention.problem(config.n_layer) if params.intervention else None
    if problem is not None:
        raise InvalidRequestError(problem[1], problem[0])
    window = config.block_size
    if len(prompt) + params.max_new_tokens > window:
        raise PromptTooLongError(len(prompt), params.max_new_tokens, window)
