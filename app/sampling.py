"""The one mapping from a request's fields to the engine's `SamplingParams`, for /generate and /v1 alike.

Each request model resolves what is its own (how many tokens when none are asked for, the seed of each choice,
how many logprobs, extra stop strings) and passes its fields here. A knob given as None takes the engine's
neutral value (the `SamplingParams` default: temperature 1, top_p 1, top_k 0, min_p 0, penalties off); that is
what /v1's null means, while /generate's fields are never null and carry the same values as their defaults.
"""

from __future__ import annotations

from collections.abc import Mapping

from model.edits import Intervention
from model.engine import SamplingParams

_NEUTRAL = SamplingParams()  # the engine's defaults: each knob's "off" value


def stop_tuple(stop: str | list[str] | None) -> tuple[str, ...]:
    """Normalise the `stop` field."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def build_sampling_params(
    *,
    max_new_tokens: int,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: tuple[str, ...] = (),
    seed: int | None = None,
    logprobs: int = 0,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    min_p: float | None = None,
    logit_bias: Mapping[str, float] | None = None,
    intervention: Intervention | None = None,
    trace: bool = False,
    logit_lens_top: int = 0,
    lens: str = "logit",
    return_stream: tuple[int, ...] = (),
) -> SamplingParams:
    """Engine parameters of one row; None for a knob = its neutral value. `logit_bias` maps token ids (as JSON's
    string keys) to biases; `intervention` the engine's form (the request's, resolved: app.steering_lookup)."""

    def knob(value: float | None, neutral: float) -> float:
        return neutral if value is None else value

    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=knob(temperature, _NEUTRAL.temperature),
        top_k=_NEUTRAL.top_k if top_k is None else top_k,
        top_p=knob(top_p, _NEUTRAL.top_p),
        stop=stop,
        seed=seed,
        logprobs=logprobs,
        presence_penalty=knob(presence_penalty, _NEUTRAL.presence_penalty),
        frequency_penalty=knob(frequency_penalty, _NEUTRAL.frequency_penalty),
        repetition_penalty=knob(repetition_penalty, _NEUTRAL.repetition_penalty),
        min_p=knob(min_p, _NEUTRAL.min_p),
        logit_bias=tuple((int(t), float(b)) for t, b in (logit_bias or {}).items()),
        intervention=intervention,
        trace=trace,
        logit_lens_top=logit_lens_top,
        lens=lens,
        return_stream=return_stream,
    )
