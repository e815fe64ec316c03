"""Continuous-batching inference engine (see `model.engine.core` for how a step flows).

The public names live here; the parts: `api` (what callers see), `request` (a request's state and its check),
`scheduler` (admission, reaping), `batch` (what a batch asks of a step), `runner` (cache, prefills, decode step),
`sampler` (logits to tokens), `output` (tokens to events), `jobs` (time-shared jobs), `core` (the worker and its step).
"""

from model.engine.api import (
    LENSES,
    MAX_LENS_TOP,
    MAX_SEED,
    EngineDrainingError,
    EngineError,
    EngineObserver,
    FinishEvent,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from model.engine.core import Engine
from model.engine.runner import KV_CACHE_DTYPES

__all__ = [
    "KV_CACHE_DTYPES",
    "LENSES",
    "MAX_LENS_TOP",
    "MAX_SEED",
    "Engine",
    "EngineDrainingError",
    "EngineError",
    "EngineObserver",
    "FinishEvent",
    "InvalidRequestError",
    "PromptTooLongError",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
]
