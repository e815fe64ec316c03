"""What clients nobody here wrote expect (issue #25): vLLM's tokenizer routes (lm-evaluation-harness reads them),
echo with max_tokens 0, errors that say what to do, model aliases, /info's losses named."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import jinja2
import jinja2.sandbox
import pytest
from fastapi.testclient import TestClient

from app.openai.chat_template import jinja_template, render_chat
from app.openai.protocol import ChatMessage
from model import tokenizer
from tests.helpers import assert_error

WINDOW = 64  # tests/conftest.py APP_CONFIG
TEXT = "To be, or not é"


# --- vLLM's tokenizer routes -------------------------------------------------------------------------------------


def test_tokenizer_info_has_vllms_fields(client: TestClient) -> None:
    resp = client.get("/tokenizer_info")
    assert resp.status_code == 200, resp.text
    info = resp.json()
    assert "eos_token" in info and info["eos_token"] is None  # lm-eval's check_remote_tokenizer_support needs the key
    assert info["bos_token"] is None and info["pad_token"] is None
    assert info["tokenizer_class"] == "ByteTokenizer"
    assert info["model_max_length"] == WINDOW and info["vocab_size"] == 256
    assert info["add_bos_token"] is False and isinstance(info["chat_template"], str)


def test_tokenize_takes_vllms_prompt_and_keeps_text(client: TestClient) -> None:
    ids = list(TEXT.encode())
    new = client.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False})
    assert new.status_code == 200, new.text
    assert new.json() == {"tokens": ids, "count": len(ids), "context_window": WINDOW, "max_model_len": WINDOW}
    old = client.post("/tokenize", json={"text": TEXT})
    assert old.json() == new.json()
    assert client.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": True}).json()["tokens"] == ids
    strs = client.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()
    assert strs["token_strs"] == ["a", "b"]


@pytest.mark.parametrize("body", [{}, {"text": "a", "prompt": "a"}, {"prompt": "a", "messages": []}])
def test_tokenize_wants_exactly_one_input(client: TestClient, body: dict) -> None:
    err = assert_error(client.post("/tokenize", json=body), 422)
    assert "exactly one of" in err["message"] or "messages" in err["message"]


def test_tokenize_messages_as_chat_renders_them(client: TestClient) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ROMEO"}]
    resp = client.post("/tokenize", json={"messages": messages})
    assert resp.status_code == 200, resp.text
    expected = "SYSTEM:\nBe brief.\n\nROMEO:\nHi\n\nASSISTANT:\n"
    assert resp.json()["tokens"] == tokenizer.encode(expected)
    closed = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert closed["tokens"] == tokenizer.encode(expected.removesuffix("ASSISTANT:\n"))
    # what /v1/chat/completions counts as the prompt
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == resp.json()["count"]


@pytest.mark.parametrize(
    "template", ["{name}:\n{content}\n\n", '<{name} "q">{content}</t>\\{{x}}\t', "{name}{content}|"]
)
def test_tokenizer_info_chat_template_renders_as_the_server_does(template: str) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "c", "name": "HAMLET"},
        {"role": "user", "content": "d é"},
    ]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)  # as lm-eval renders
    for add in (True, False):
        ours, _ = render_chat(template, [ChatMessage(**m) for m in messages], add)
        theirs = env.from_string(jinja_template(template)).render(messages=messages, add_generation_prompt=add)
        assert theirs == ours


def test_detokenize_answers_prompt_and_text(client: TestClient) -> None:
    resp = client.post("/detokenize", json={"tokens": [116, 101]})
    assert resp.json() == {"text": "te", "prompt": "te"}


# --- echo with max_tokens 0 ---------------------------------------------------------------------------------------


def test_echo_with_max_tokens_0_scores_a_whole_window(client: TestClient) -> None:
    prompt = ("To be, or not to be: that is the question. " * 3)[:WINDOW]
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    [choice] = out["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == WINDOW and lp["token_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert out["usage"] == {"prompt_tokens": WINDOW, "completion_tokens": 0, "total_tokens": WINDOW}
    # the same numbers as max_tokens 1 gives for the prompt part of a shorter text
    short = {**body, "prompt": prompt[:40]}
    zero = client.post("/v1/completions", json=short).json()["choices"][0]["logprobs"]["token_logprobs"]
    one = client.post("/v1/completions", json={**short, "max_tokens": 1}).json()["choices"][0]["logprobs"]
    assert zero == one["token_logprobs"][:40]
    # a whole window with max_tokens 1 does not fit; one byte more than the window is refused with a reason
    assert_error(client.post("/v1/completions", json={**body, "max_tokens": 1}), 400, "context_length_exceeded")
    err = assert_error(client.post("/v1/completions", json={**body, "prompt": prompt + "x"}), 400)
    assert err["code"] == "context_length_exceeded" and "one token is one UTF-8 byte" in err["message"]


def test_echo_max_tokens_0_lists_n_and_streams(client: TestClient) -> None:
    body = {"prompt": ["ab", "cde"], "max_tokens": 0, "echo": True, "n": 2}
    out = client.post("/v1/completions", json=body).json()
    assert [(c["index"], c["text"], c["logprobs"]) for c in out["choices"]] == [
        (0, "ab", None),
        (1, "ab", None),
        (2, "cde", None),
        (3, "cde", None),
    ]
    resp = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    lines = [json.loads(x[6:]) for x in resp.text.split("\n\n") if x.startswith("data: {")]
    assert [c["choices"][0]["text"] for c in lines[:-1]] == ["ab", "ab", "cde", "cde"]
    assert lines[-1]["usage"]["prompt_tokens"] == 5 and resp.text.endswith("data: [DONE]\n\n")


def test_max_tokens_0_without_echo_says_why(client: TestClient) -> None:
    err = assert_error(
        client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400, "invalid_value", "max_tokens"
    )
    assert "echo" in err["message"]
    err = assert_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0, "echo": False}), 400)
    assert "only allowed with echo: true" in err["message"]


# --- errors that say what to do -----------------------------------------------------------------------------------


def test_invalid_json_gives_the_parsers_reason_and_position(client: TestClient) -> None:
    raw = b'{"prompt": "To be,\nor not"}'  # a raw newline inside a string, as a body wrapped in an editor
    resp = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    err = assert_error(resp, 422, code="json_invalid")
    assert "Invalid control character" in err["message"]
    assert "line 1, column 19 (character 18)" in err["message"] and "\\n" in err["message"]
    resp = client.post(
        "/v1/completions", content=b'{"prompt": "x",\n "n": }', headers={"content-type": "application/json"}
    )
    assert "line 2, column 7 (character 22)" in assert_error(resp, 422, code="json_invalid")["message"]


def test_missing_content_type_says_to_send_it(client: TestClient) -> None:
    body = json.dumps({"prompt": "To be"}).encode()
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}):
        err = assert_error(client.post("/generate", content=body, headers=headers), 422)
        assert "Content-Type: application/json" in err["message"]
    # a JSON body that is not an object keeps the schema's message
    err = assert_error(client.post("/generate", json=["To be"]), 422)
    assert "Content-Type" not in err["message"]


@pytest.mark.parametrize(
    ("field", "says"),
    [("max_tokens", "max_new_tokens"), ("max_completion_tokens", "max_new_tokens"), ("n", "/v1/completions")],
)
def test_generate_names_its_own_field_for_openais(client: TestClient, field: str, says: str) -> None:
    err = assert_error(client.post("/generate", json={"prompt": "To be", field: 5}), 422, param=field)
    assert says in err["message"] and "Extra inputs" not in err["message"]
    unknown = assert_error(client.post("/generate", json={"prompt": "To be", "nonsense": 5}), 422)
    assert "Extra inputs are not permitted" in unknown["message"]


def test_v1_names_its_own_field_for_generates(client: TestClient) -> None:
    resp = client.post("/v1/completions", json={"prompt": "To be", "max_new_tokens": 5})
    err = assert_error(resp, 400, code="unsupported_parameter", param="max_new_tokens")
    assert "max_tokens" in err["message"]


def test_prompt_over_the_window_says_bytes_and_names_no_unsent_value(client: TestClient) -> None:
    long = "x" * (WINDOW + 10)
    for path, body in (("/generate", {"prompt": long}), ("/v1/completions", {"prompt": long})):
        err = assert_error(client.post(path, json=body), 400, "context_length_exceeded", "prompt")
        msg = err["message"]
        assert "one token is one UTF-8 byte" in msg and f"{WINDOW + 10} tokens" in msg
        assert "max_tokens" not in msg and "max_new_tokens" not in msg, msg
    err = assert_error(client.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 10}), 400)
    assert "max_tokens (10)" in err["message"] and "one UTF-8 byte" in err["message"]


def test_info_names_the_training_time_val_loss(client: TestClient, tmp_path_factory: pytest.TempPathFactory) -> None:
    from app.routes.health import VAL_LOSS_NOTE

    meta = client.get("/info").json()["models"]["tiny"]["checkpoint_metadata"]
    assert "val_loss" not in meta  # the fixture has none: nothing is made up
    from app.routes.health import checkpoint_metadata

    shown = checkpoint_metadata({"val_loss": 1.521, "steps": 4500, "train_state": {"x": 1}})
    assert "val_loss" not in shown and "train_state" not in shown
    assert shown["val_loss_training_estimate"] == {"nats_per_byte": 1.521, "measured": VAL_LOSS_NOTE}
    assert "training.evaluate" in VAL_LOSS_NOTE


# --- model aliases ------------------------------------------------------------------------------------------------


def test_unknown_model_is_404_by_default(client: TestClient) -> None:
    resp = client.post("/v1/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": "x", "max_tokens": 1})
    assert_error(resp, 404, "model_not_found", "model")


def test_model_aliases_serve_client_side_names(make_client: Callable[..., TestClient]) -> None:
    client = make_client(model_aliases="gpt-3.5-turbo-instruct=tiny, gpt-3.5-turbo=tiny")
    body = {"prompt": "To be", "max_tokens": 3, "temperature": 0}
    aliased = client.post("/v1/completions", json={**body, "model": "gpt-3.5-turbo-instruct"}).json()
    plain = client.post("/v1/completions", json={**body, "model": "tiny"}).json()
    assert aliased["model"] == "gpt-3.5-turbo-instruct"  # answered under the name sent, as vLLM does
    assert aliased["choices"][0]["text"] == plain["choices"][0]["text"]
    chat = client.post(
        "/v1/chat/completions", json={"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert chat.status_code == 200 and chat.json()["model"] == "gpt-3.5-turbo"
    cards = {c["id"]: c["root"] for c in client.get("/v1/models").json()["data"]}
    assert cards == {"tiny": "tiny", "gpt-3.5-turbo-instruct": "tiny", "gpt-3.5-turbo": "tiny"}
    assert client.get("/v1/models/gpt-3.5-turbo").json()["root"] == "tiny"
    assert_error(client.post("/v1/completions", json={**body, "model": "gpt-4"}), 404, "model_not_found")


@pytest.mark.parametrize("value", ["gpt=nope", "tiny=tiny", "a", "a=", "bad name=tiny", "a=tiny,a=tiny"])
def test_bad_model_aliases_are_refused_at_startup(value: str, app_checkpoint: object) -> None:
    from app.main import create_app
    from tests.conftest import app_settings

    with pytest.raises(ValueError, match="SHORTCUT_MODEL_ALIASES"):  # pydantic's ValidationError is a ValueError
        with TestClient(create_app(app_settings(app_checkpoint, model_aliases=value))):  # type: ignore[arg-type]
            pass


def test_scores_are_finite(client: TestClient) -> None:
    lp = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    assert math.isfinite(lp["choices"][0]["logprobs"]["token_logprobs"][1])


def test_diagnostics_takes_byte_tokens(client: TestClient) -> None:
    """The page's Inspect sends the bytes a generation wrote (they need not be valid UTF-8)."""
    by_text = client.post("/diagnostics", json={"prompt": "To be"}).json()
    by_ids = client.post("/diagnostics", json={"tokens": list(b"To be")})
    assert by_ids.status_code == 200, by_ids.text
    assert by_ids.json()["loss"] == by_text["loss"] and by_ids.json()["n_tokens"] == 5
    invalid = client.post("/diagnostics", json={"tokens": [84, 0xC2, 0xC2]})
    assert invalid.status_code == 200 and invalid.json()["n_tokens"] == 3
    assert_error(client.post("/diagnostics", json={"prompt": "a", "tokens": [97]}), 422)
    err = assert_error(client.post("/diagnostics", json={"tokens": [97] * (WINDOW + 1)}), 400, param="tokens")
    assert "one token is one UTF-8 byte" in err["message"]
