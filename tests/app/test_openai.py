"""OpenAI compatibility of /v1/completions and /v1/models: the official `openai` client against a live server.

Responses are also parsed with the client's own pydantic types (validation on) and dumped back: nothing is lost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Completion, Model

from app.openai.protocol import choice_seed
from model import tokenizer
from tests.conftest import SLOW_STEP_S
from tests.helpers import assert_error, idle, parse_sse, value, wait_for
from tests.live_server import Server

PROMPT = "The residual stream"


@pytest.fixture(scope="module")
def oai(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0, timeout=30)


def native(live_server: str, **body: object) -> dict:
    """The same generation through /generate, as the reference."""
    resp = httpx.post(f"{live_server}/generate", json={"prompt": PROMPT, **body}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def raw(live_server: str, **body: object) -> dict:
    resp = httpx.post(f"{live_server}/v1/completions", json={"model": "tiny", "prompt": PROMPT, **body}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def raw_stream(live_server: str, **body: object) -> list[dict]:
    """The data of every SSE event of a streamed completion; checks it ends with [DONE]."""
    resp = httpx.post(
        f"{live_server}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "stream": True, **body}, timeout=30
    )
    assert resp.status_code == 200, resp.text
    events = [data for _, data in parse_sse(resp.text)]
    assert events[-1] == "[DONE]"
    return events[:-1]


def assert_round_trips(model: type, data: dict) -> None:
    """The client's type validates `data` and dumps it back unchanged (no field lost or altered)."""
    assert model.model_validate(data).model_dump(mode="json", exclude_unset=True) == data


def test_models(oai: openai.OpenAI, live_server: str, app_checkpoint: Path) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = httpx.get(f"{live_server}/v1/models").json()
    assert card["object"] == "list"
    m = card["data"][0]
    assert m["object"] == "model" and m["owned_by"] == "shortcut"
    assert m["context_window"] == 64 and m["n_layer"] == 2 and m["d_model"] == 16 and m["residual"] is True
    assert m["checkpoint_sha256"] == hashlib.sha256(app_checkpoint.read_bytes()).hexdigest()
    assert_round_trips(Model, m)


def test_model_by_id(oai: openai.OpenAI, live_server: str) -> None:
    m = oai.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model"
    assert httpx.get(f"{live_server}/v1/models/tiny").json() == httpx.get(f"{live_server}/v1/models").json()["data"][0]
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")
    assert_error(httpx.get(f"{live_server}/v1/models/nope"), 404, code="model_not_found", param="model")


def test_completion(oai: openai.OpenAI, live_server: str) -> None:
    resp = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert resp.object == "text_completion"
    assert resp.model == "tiny"
    assert resp.id.startswith("cmpl-")
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text == native(live_server, max_new_tokens=10, temperature=0)["text"]
    assert resp.usage.prompt_tokens == len(PROMPT.encode())
    assert resp.usage.completion_tokens == 10
    assert resp.usage.total_tokens == len(PROMPT.encode()) + 10
    assert resp.system_fingerprint.startswith("sha256-")
    assert choice.logprobs is None
    assert_round_trips(Completion, raw(live_server, max_tokens=10, temperature=0, logprobs=2))


def test_completion_seed_and_stop(oai: openai.OpenAI, live_server: str) -> None:
    a = oai.completions.create(model="tiny", prompt=[PROMPT], max_tokens=12, seed=11, top_p=0.9)
    b = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=11, top_p=0.9)
    assert a.choices[0].text == b.choices[0].text == native(live_server, max_new_tokens=12, seed=11, top_p=0.9)["text"]
    full = native(live_server, max_new_tokens=20, temperature=0)["text"]
    i = next(i for i in range(3, 18) if "\ufffd" not in full[i] and full.find(full[i]) == i)
    stopped = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[full[i]])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[:i]


def test_max_tokens_omitted_and_null_both_mean_16(oai: openai.OpenAI, live_server: str) -> None:
    omitted = raw(live_server, temperature=0)
    null = raw(live_server, temperature=0, max_tokens=None)
    assert omitted["usage"]["completion_tokens"] == null["usage"]["completion_tokens"] == 16
    assert omitted["choices"][0]["text"] == null["choices"][0]["text"]
    # capped by what the 64-token window leaves, never a 400
    long = oai.completions.create(model="tiny", prompt="x" * 56, temperature=0)
    assert long.usage.completion_tokens == 8


def test_completion_stream(oai: openai.OpenAI, live_server: str) -> None:
    chunks = list(
        oai.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks, finish, usage = chunks[:-2], chunks[-2], chunks[-1]
    assert all(c.object == "text_completion" and c.model == "tiny" for c in chunks)
    assert all(c.choices[0].text and c.choices[0].finish_reason is None for c in text_chunks)
    assert all(c.usage is None for c in chunks[:-1])
    assert finish.choices[0].finish_reason == "length" and finish.choices[0].text == ""
    assert usage.choices == [] and usage.usage.completion_tokens == 12  # the spec's final usage chunk
    assert usage.usage.prompt_tokens == len(PROMPT.encode())
    assert (
        "".join(c.choices[0].text for c in chunks[:-1]) == native(live_server, max_new_tokens=12, temperature=0)["text"]
    )
    plain = raw_stream(live_server, max_tokens=3, temperature=0)
    assert all("usage" not in c for c in plain)  # without include_usage: no usage field at all


def test_held_back_text_streams_no_empty_chunks(live_server: str) -> None:
    full = native(live_server, max_new_tokens=24, temperature=0)["text"]
    # a stop string whose start keeps appearing but that never completes: every match of its prefix is held back
    stop = full[4:6] + "\u2603"
    body = dict(max_tokens=24, temperature=0, stop=[stop, full[9] + "\u2603"], logprobs=0)
    events = raw_stream(live_server, **body)
    *tokens, last = events
    assert all(e["choices"][0]["text"] for e in tokens)
    assert last["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events) == full
    # each token's logprob rides on the chunk that releases its text: all 24 arrive, in order
    streamed = [t for e in events for t in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(raw(live_server, **body)["choices"][0]["logprobs"]["token_logprobs"])
    assert len(streamed) == 24
    assert len(tokens) < 24  # some tokens were held back, and sent no chunk of their own


def test_logprobs_like_openai(live_server: str) -> None:
    body = dict(max_tokens=8, seed=3, temperature=1.5)
    ref = native(live_server, max_new_tokens=8, seed=3, temperature=1.5, logprobs=2)["tokens"]
    zero = raw(live_server, logprobs=0, **body)["choices"][0]["logprobs"]
    assert zero["tokens"] == [t["text"] for t in ref]
    assert zero["token_logprobs"] == pytest.approx([t["logprob"] for t in ref], abs=1e-6)
    assert zero["top_logprobs"] == [pytest.approx({t["text"]: t["logprob"]}, abs=1e-6) for t in ref]
    two = raw(live_server, logprobs=2, **body)["choices"][0]["logprobs"]
    assert two["token_logprobs"] == zero["token_logprobs"]
    outside = 0
    for tops, t in zip(two["top_logprobs"], ref, strict=True):
        expected = {x["text"]: x["logprob"] for x in t["top_logprobs"]} | {t["text"]: t["logprob"]}
        assert tops == pytest.approx(expected, abs=1e-6)  # the top 2, plus the sampled token when not among them
        outside += len(tops) == 3
    assert outside > 0  # temperature 1.5 sampled outside the top 2 at least once


def test_text_offsets_point_at_each_token(live_server: str) -> None:
    # a prompt of byte tokens that decode to multi-byte characters: the bytes of one character share its offset
    resp = raw(live_server, prompt=list("aé€b".encode()), max_tokens=1, temperature=0, echo=True, logprobs=0)
    lp = resp["choices"][0]["logprobs"]
    assert resp["choices"][0]["text"].startswith("aé€b")
    assert lp["text_offset"][:7] == [0, 1, 1, 2, 2, 2, 3]
    assert lp["tokens"][:3] == ["a", "<0xC3>", "<0xA9>"]
    assert lp["text_offset"][7] == 4


def test_n_and_lists_of_prompts(oai: openai.OpenAI, live_server: str) -> None:
    resp = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=3, seed=7)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.text for c in resp.choices]
    assert texts == [native(live_server, max_new_tokens=8, seed=choice_seed(7, i))["text"] for i in range(3)]
    assert texts[0] == native(live_server, max_new_tokens=8, seed=7)["text"]  # choice 0 uses the seed itself
    assert len(set(texts)) == 3
    assert resp.usage.prompt_tokens == len(PROMPT.encode()) and resp.usage.completion_tokens == 24
    again = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=3, seed=7)
    assert [c.text for c in again.choices] == texts
    prompts = ["To be", "or not"]
    many = oai.completions.create(model="tiny", prompt=prompts, max_tokens=5, n=2, temperature=0)
    # OpenAI's order: both choices of prompt 0, then both of prompt 1
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    expected = [native(live_server, prompt=p, max_new_tokens=5, temperature=0)["text"] for p in prompts]
    assert [c.text for c in many.choices] == [expected[0]] * 2 + [expected[1]] * 2
    assert many.usage.prompt_tokens == sum(len(p) for p in prompts)
    tokens = oai.completions.create(
        model="tiny", prompt=[tokenizer.encode(p) for p in prompts], max_tokens=5, temperature=0
    )
    assert [c.text for c in tokens.choices] == expected
    one = oai.completions.create(model="tiny", prompt=tokenizer.encode(prompts[0]), max_tokens=5, temperature=0)
    assert one.choices[0].text == expected[0]


def test_n_streams_interleaved_with_index(oai: openai.OpenAI) -> None:
    body = dict(model="tiny", prompt=["To be", "or not"], max_tokens=10, n=2, seed=4)
    plain = oai.completions.create(**body)
    chunks = list(oai.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    texts = {i: "" for i in range(4)}
    finishes = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            finishes[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in plain.choices]
    assert finishes == {i: "length" for i in range(4)}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40


def test_n_and_prompt_limits(live_server: str) -> None:
    r = httpx.post(f"{live_server}/v1/completions", json={"prompt": PROMPT, "n": 9})
    assert "SHORTCUT_MAX_N" in assert_error(r, 400, code="invalid_value", param="n")["message"]
    r = httpx.post(f"{live_server}/v1/completions", json={"prompt": ["a"] * 17, "max_tokens": 1})
    assert_error(r, 400, code="invalid_value", param="prompt")
    r = httpx.post(f"{live_server}/v1/completions", json={"prompt": [1, 256], "max_tokens": 1})
    assert_error(r, 400, code="invalid_value", param="prompt")


def test_best_of(oai: openai.OpenAI) -> None:
    a = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=2, best_of=2, seed=1)
    b = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=2, seed=1)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, best_of=3)
    assert info.value.code == "unsupported_parameter" and info.value.param == "best_of"


def test_echo(oai: openai.OpenAI, live_server: str) -> None:
    plain = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    echoed = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    chunks = list(
        oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, echo=True, stream=True)
    )
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


def test_echo_with_logprobs_scores_the_prompt(oai: openai.OpenAI, live_server: str) -> None:
    # score PROMPT + its greedy continuation (as token ids: the bytes need not be valid UTF-8) with echo: the
    # continuation's prompt logprobs must be those the generation reported (decode uses float16 weights: a tolerance)
    generated = native(live_server, max_new_tokens=6, temperature=0, logprobs=1)["tokens"]
    ids = tokenizer.encode(PROMPT) + [t["id"] for t in generated]
    n_prompt = len(ids)
    scored = raw(live_server, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)["choices"][0]
    lp = scored["logprobs"]
    assert scored["text"].startswith(tokenizer.decode(ids))
    assert lp["tokens"][:n_prompt] == [tokenizer.token_text(t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    assert lp["token_logprobs"][-7:-1] == pytest.approx([t["logprob"] for t in generated], abs=2e-3)
    for tops, t in zip(lp["top_logprobs"][-7:-1], generated, strict=True):  # greedy: the token is the top 1
        assert tops == pytest.approx({t["text"]: t["logprob"]}, abs=2e-3)
    assert len(lp["tokens"]) == n_prompt + 1
    # streamed: the first chunk carries the prompt and its logprobs
    chunks = raw_stream(live_server, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert chunks[0]["choices"][0]["text"] == tokenizer.decode(ids)
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n_prompt]
    client_view = oai.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert client_view.choices[0].logprobs.token_logprobs == lp["token_logprobs"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suffix", "end"),
        ("foo", 1),
        ("typical_p", 0.5),
        ("stop_token_ids", [10]),
        ("ignore_eos", True),
        ("min_tokens", 3),
        ("prompt_logprobs", 1),
    ],
)
def test_unsupported_fields_are_400(oai: openai.OpenAI, live_server: str, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={field: value})
    assert info.value.code == "unsupported_parameter" and info.value.param == field
    resp = httpx.post(f"{live_server}/v1/completions", json={"prompt": PROMPT, field: value})
    err = assert_error(resp, 400, code="unsupported_parameter", param=field)
    assert err["message"].startswith(f"{field}: ")


def test_extensions_through_the_openai_client(oai: openai.OpenAI) -> None:
    """intervention / trace / logit_lens_top go in extra_body; the client keeps the extension fields it returns."""
    skip = {"skip": [{"layer": 0, "part": "block"}], "scale": []}
    resp = oai.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=3,
        temperature=0,
        extra_body={"intervention": skip, "trace": True, "logit_lens_top": 1},
    )
    assert resp.model_extra["intervention"] == skip
    trace = resp.choices[0].model_extra["trace"]
    assert len(trace) == 3 and all(len(t["logit_lens"][0]) == 1 for t in trace)
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=2,
            extra_body={"intervention": {"skip": [{"layer": 0, "part": "ffn"}]}},
        )
    assert info.value.param == "intervention.skip[0].part"


def test_neutral_values_of_unserved_fields_are_accepted(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=2,
        suffix=None,
        best_of=1,
        user="u-1",
        extra_body={"stop_token_ids": [], "ignore_eos": False},
    )
    assert len(resp.choices) == 1


def test_stream_options_rules(live_server: str) -> None:
    r = httpx.post(f"{live_server}/v1/completions", json={"prompt": PROMPT, "stream_options": {"include_usage": True}})
    assert_error(r, 400, code="invalid_value", param="stream_options")
    r = httpx.post(
        f"{live_server}/v1/completions",
        json={"prompt": PROMPT, "stream": True, "stream_options": {"continuous_usage_stats": True}},
    )
    assert_error(r, 400, code="unsupported_parameter", param="stream_options.continuous_usage_stats")
    r = httpx.post(
        f"{live_server}/v1/completions",
        json={"prompt": PROMPT, "stream": True, "stream_options": {"include_obfuscation": True}},
    )
    assert_error(r, 400, code="unsupported_parameter", param="stream_options.include_obfuscation")


def test_unknown_model_is_404(oai: openai.OpenAI, live_server: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert info.value.status_code == 404
    assert "no-such-model" in str(info.value)
    resp = httpx.post(f"{live_server}/v1/completions", json={"model": "no-such-model", "prompt": PROMPT})
    assert_error(resp, 404, code="model_not_found", param="model")


def test_too_long_is_400(oai: openai.OpenAI, live_server: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny", prompt="x" * 60, max_tokens=10)
    assert "64" in str(info.value)
    # the error names this route's field (max_tokens), not the engine's
    resp = httpx.post(f"{live_server}/v1/completions", json={"prompt": "x" * 60, "max_tokens": 10})
    err = assert_error(resp, 400, code="context_length_exceeded", param="max_tokens")
    assert "max_tokens (10)" in err["message"] and "max_new_tokens" not in err["message"]
    resp = httpx.post(f"{live_server}/v1/completions", json={"prompt": "x" * 70})
    assert_error(resp, 400, code="context_length_exceeded", param="prompt")
    resp = httpx.post(f"{live_server}/v1/completions", json={"prompt": "hi", "stop": ["x" * 65]})
    assert_error(resp, 400, code="invalid_value", param="stop")


# ---- sampling controls ----------------------------------------------------------------------------------------------

CONTROLS = {
    "logit_bias": {"logit_bias": {"101": 6, "32": -100}},
    "presence_penalty": {"presence_penalty": 1.5},
    "frequency_penalty": {"frequency_penalty": 1.2},
    "repetition_penalty": {"repetition_penalty": 1.6},
    "min_p": {"min_p": 0.3},
}


def test_logit_bias_forces_and_bans_tokens(oai: openai.OpenAI, live_server: str) -> None:
    forced = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, seed=1, logit_bias={"65": 100})
    assert forced.choices[0].text == "A" * 6
    clamped = raw(live_server, max_tokens=6, seed=1, logit_bias={"65": 1e6})  # clamped to 100: the same draw
    assert clamped["choices"][0]["text"] == "A" * 6
    greedy = native(live_server, max_new_tokens=6, temperature=0)["text"]
    first = str(greedy.encode()[0])
    banned = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={first: -100})
    assert banned.choices[0].text.encode()[0] != int(first)
    r = httpx.post(f"{live_server}/v1/completions", json={"prompt": PROMPT, "logit_bias": {"300": 1}})
    assert_error(r, 400, code="invalid_value", param="logit_bias")


@pytest.mark.parametrize("name", list(CONTROLS))
def test_each_control_on_v1_equals_generate_and_changes_the_output(live_server: str, name: str) -> None:
    body = dict(max_tokens=20, seed=9, **CONTROLS[name])
    text = raw(live_server, **body)["choices"][0]["text"]
    assert text == native(live_server, max_new_tokens=20, seed=9, **CONTROLS[name])["text"]
    assert text != raw(live_server, max_tokens=20, seed=9)["choices"][0]["text"]


def test_seeded_controls_alone_equal_inside_a_mixed_batch(live_server: str) -> None:
    bodies = [dict(max_tokens=16, seed=20 + i, **c) for i, c in enumerate(CONTROLS.values())]
    alone = [raw(live_server, **b)["choices"][0]["text"] for b in bodies]
    # all at once (plus others with n > 1 and other controls): they share decode steps in one batch
    mixed = bodies + [
        dict(max_tokens=12, n=3, temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5),
        dict(max_tokens=10, n=2, min_p=0.1, logit_bias={"10": 3}),
    ]
    with ThreadPoolExecutor(len(mixed)) as pool:
        together = list(pool.map(lambda b: raw(live_server, **b), mixed))
    assert [r["choices"][0]["text"] for r in together[: len(bodies)]] == alone
    streamed = ["".join(e["choices"][0]["text"] for e in raw_stream(live_server, **b) if e["choices"]) for b in bodies]
    assert streamed == alone


def test_disconnect_cancels_every_row_of_a_request(start_server: Callable[..., Server], slow_checkpoint: Path) -> None:
    url = start_server(slow_checkpoint, step_delay_s=SLOW_STEP_S).url
    before = wait_for(url, idle)
    aborted = value(before, "shortcut_request_success_total", finished_reason="abort")
    body = {"prompt": ["go", "away"], "n": 2, "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        next(line for line in resp.iter_lines() if line.startswith("data: "))
    after = wait_for(
        url, lambda s: idle(s) and value(s, "shortcut_request_success_total", finished_reason="abort") == aborted + 4
    )
    assert value(after, "shortcut_generation_tokens_total") - value(before, "shortcut_generation_tokens_total") < 800
    with ThreadPoolExecutor(1) as pool:  # the same without streaming: the client gives up, all four rows leave
        gone = pool.submit(lambda: httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.5))
        with pytest.raises(httpx.ReadTimeout):
            gone.result()
    wait_for(
        url, lambda s: idle(s) and value(s, "shortcut_request_success_total", finished_reason="abort") == aborted + 8
    )
