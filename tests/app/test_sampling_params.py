"""One mapping from request fields to the engine's SamplingParams: /generate's defaults, /v1's nulls and omitted
fields all reach the engine as the same neutral values."""

from __future__ import annotations

from app.openai.protocol import ChatCompletionRequest, CompletionRequest, choice_seed
from app.protocol import GenerateRequest
from app.sampling import build_sampling_params
from model.engine import SamplingParams

KNOBS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def test_a_null_knob_is_the_engines_neutral_value() -> None:
    assert build_sampling_params(max_new_tokens=7, **dict.fromkeys(KNOBS)) == SamplingParams(max_new_tokens=7)


def test_generate_defaults_v1_nulls_and_omitted_fields_agree() -> None:
    neutral = SamplingParams(max_new_tokens=9)
    assert GenerateRequest(prompt="a").to_sampling_params(9) == neutral
    assert CompletionRequest(prompt="a").to_sampling_params(9) == neutral
    assert CompletionRequest(prompt="a", **dict.fromkeys(KNOBS)).to_sampling_params(9) == neutral
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **dict.fromkeys(KNOBS))
    assert chat.to_sampling_params(9, "\nEND") == SamplingParams(max_new_tokens=9, stop=("\nEND",))


def test_every_field_reaches_the_engine_the_same_way_on_both_apis() -> None:
    fields = dict(
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        stop=["x", "y"],
        seed=11,
        presence_penalty=0.25,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        min_p=0.05,
        logit_bias={"65": 2, "66": -1.5},
        intervention={"skip": [{"layer": 0, "part": "mlp"}], "scale": [{"layer": 1, "part": "attn", "factor": 2}]},
        trace=True,
        logit_lens_top=2,
        lens="tuned",
    )
    native = GenerateRequest(prompt="a", max_new_tokens=5, logprobs=2, **fields).to_sampling_params(64)
    v1 = CompletionRequest(prompt="a", max_tokens=5, logprobs=2, **fields).to_sampling_params(16)
    assert native == v1
    assert native.logit_bias == ((65, 2.0), (66, -1.5))
    assert native.stop == ("x", "y") and native.seed == 11 and native.traced and native.lens == "tuned"
    assert native.intervention is not None and native.intervention.to_dict() == {
        "skip": [{"layer": 0, "part": "mlp"}],
        "scale": [{"layer": 1, "part": "attn", "factor": 2.0}],
    }


def test_each_v1_request_resolves_its_own_fields() -> None:
    body = CompletionRequest(prompt="a", seed=5, logprobs=0)
    assert [body.to_sampling_params(16, choice=i).seed for i in range(3)] == [choice_seed(5, i) for i in range(3)]
    assert body.to_sampling_params(16).logprobs == 1  # logprobs: 0 still asks the engine for the chosen token's
    assert body.to_sampling_params(16).max_new_tokens == 16 and CompletionRequest.DEFAULT_MAX_TOKENS == 16
    chat = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], stop=["\nEND", "z"], max_tokens=4, logprobs=True
    )
    params = chat.to_sampling_params(99, "\nEND")
    assert params.stop == ("\nEND", "z")  # the turn end first, each stop once
    assert params.max_new_tokens == 4 and params.logprobs == 1
    assert chat.model_copy(update={"max_completion_tokens": 3}).to_sampling_params(99, "\n").max_new_tokens == 3
    assert (
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]).to_sampling_params(99, "\n").logprobs == 0
    )
