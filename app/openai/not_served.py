"""The OpenAI fields this server does not serve, and their refusal: a 400 `unsupported_parameter` that names the
field and says what to use instead. A field is let through when it holds a value that changes nothing."""

from __future__ import annotations

from typing import Any

from app.errors import APIError

NO_TOOLS = "tool and function calling are not served: the model is a plain byte-level LM without a tool format"
# OpenAI (and common vLLM) fields this server does not serve: (values accepted because they change nothing, message)
NOT_SERVED: dict[str, tuple[tuple[object, ...], str]] = {
    "suffix": ((None, ""), "suffix (insertion) is not served: the model only continues text; put it all in prompt"),
    "tools": ((None, []), NO_TOOLS),
    "tool_choice": ((None, "none"), NO_TOOLS),
    "parallel_tool_calls": ((None, True, False), NO_TOOLS),
    "functions": ((None, []), NO_TOOLS),
    "function_call": ((None, "none"), NO_TOOLS),
    "response_format": ((None, {"type": "text"}), "only plain text is served (no JSON mode or structured outputs)"),
    "modalities": ((None, ["text"]), "only text is served"),
    "audio": ((None,), "only text is served"),
    "prediction": ((None,), "predicted outputs are not served"),
    "reasoning_effort": ((None,), "not a reasoning model"),
    "verbosity": ((None,), "not served; the length is set by max_tokens and stop"),
    "web_search_options": ((None,), "web search is not served"),
    "store": ((None, False), "completions are not stored"),
    "metadata": ((None, {}), "metadata is only kept with store, which is not served"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "moderation": ((None,), "moderation is not served"),
    "prompt_cache_key": ((None,), "there is no prompt cache"),
    "prompt_cache_retention": ((None,), "there is no prompt cache"),
    "prompt_cache_options": ((None,), "there is no prompt cache"),
    "stop_token_ids": ((None, []), "use stop: a token is a byte, so a one-character stop string does the same"),
    "ignore_eos": ((None, False), "the byte-level model has no end-of-sequence token"),
    "min_tokens": ((None, 0), "not served; generation ends at max_tokens or a stop string"),
    "typical_p": ((None, 1, 1.0), "not served; use top_p, top_k or min_p"),
    "prompt_logprobs": ((None,), "use echo with logprobs (completions)"),
    "use_beam_search": ((None, False), "beam search is not served"),
    "max_new_tokens": ((None,), "/v1's field is max_tokens (max_new_tokens is /generate's name)"),
    "include_stop_str_in_output": ((None, False), "not served; the text ends before the stop string"),
}
MESSAGE_NOT_SERVED: dict[str, tuple[tuple[object, ...], str]] = {
    "tool_calls": ((None, []), NO_TOOLS),
    "function_call": ((None,), NO_TOOLS),
    "tool_call_id": ((None,), NO_TOOLS),
    "refusal": ((None,), "refusal messages are not served"),
    "audio": ((None,), "only text is served"),
    "annotations": ((None, []), "annotations are not served"),
}
UNKNOWN = (
    "unknown parameter: not an OpenAI field this server serves, nor one of its extensions "
    "(README, OpenAI section, lists them all)"
)


def unsupported(param: str, message: str) -> APIError:
    """The 400 for a field this server does not serve."""
    return APIError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


def refuse_extra(
    extra: dict[str, Any] | None, table: dict[str, tuple[tuple[object, ...], str]], prefix: str = ""
) -> None:
    """Refuse each field of `extra` (a model's unknown fields) unless `table` lists it with a value that changes
    nothing."""
    for name, value in (extra or {}).items():
        allowed, message = table.get(name, (None, None))
        if allowed is not None and any(value == a and type(value) is type(a) for a in allowed):
            continue
        raise unsupported(f"{prefix}{name}", message or UNKNOWN)
