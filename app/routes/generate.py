"""POST /generate (with SSE streaming), /tokenize and /detokenize, GET /tokenizer_info."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.deps import get_served
from app.errors import ERRORS, error_body
from app.generation import check_answer_size, collect, default_max_new, finish_error, json_answer, stream_events, submit
from app.openai.chat_template import jinja_template, render_chat
from app.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    GenerateResponse,
    TokenInfo,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    TopLogprob,
)
from app.readout_protocol import ITEMSIZE, check_bytes, encode_one, generated_hidden_states, stream_points
from app.schemas import InterventionEcho, Trace
from app.service import ServedModel
from app.sse import sse_event, sse_response
from app.steering_lookup import resolve
from model import tokenizer
from model.engine import FinishEvent, SamplingParams, TokenEvent

router = APIRouter(tags=["generation"], responses=ERRORS)


def token_info(ev: TokenEvent) -> TokenInfo:
    """Per-token details for the response."""
    tops: list[TopLogprob] | None = None
    if ev.top_logprobs is not None:
        tops = [TopLogprob(id=i, text=tokenizer.token_text(i), logprob=lp) for i, lp in ev.top_logprobs]
    return TokenInfo(id=ev.token_id, text=tokenizer.token_text(ev.token_id), logprob=ev.logprob, top_logprobs=tops)


def build_response(
    rid: str,
    served: ServedModel,
    tokens: list[TokenEvent],
    fin: FinishEvent,
    params: SamplingParams,
    body: GenerateRequest | None = None,
    layers: list[int] | None = None,
) -> GenerateResponse:
    """The /generate result object (with the tokens' vectors when `body` asks for them, of `layers`)."""
    iv = params.intervention
    spec = body.return_hidden_states if body is not None else None
    hidden = None
    if spec is not None and layers is not None:
        hidden = generated_hidden_states(spec, layers, [t.stream for t in tokens])
    return GenerateResponse.model_validate(
        {
            "id": rid,
            "model": served.name,
            "text": fin.text,
            "finish_reason": fin.reason,
            "usage": {
                "prompt_tokens": fin.prompt_tokens,
                "completion_tokens": fin.completion_tokens,
                "total_tokens": fin.prompt_tokens + fin.completion_tokens,
            },
            "tokens": [token_info(t) for t in tokens] if params.logprobs > 0 else None,
            "timings": fin.timings,
            "seed": fin.seed,
            "checkpoint_sha256": served.sha256,
            "intervention": InterventionEcho.model_validate(iv.to_dict()) if iv is not None else None,
            "trace": Trace.model_validate({"tokens": [t.trace for t in tokens]}) if params.traced else None,
            "hidden_states": hidden,
        }
    )


def sse(event: str, data: dict[str, Any]) -> str:
    """One Server-Sent Event."""
    return sse_event(data, event)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or Server-Sent Events when stream=true"}
    },
)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse | StreamingResponse:
    """Continue `prompt`. With `stream: true`, Server-Sent Events: `token` per token, then `done` (or `error`)."""
    served = get_served(request, body.model)
    n_prompt = len(tokenizer.encode(body.prompt))
    settings = request.app.state.settings
    intervention = resolve(body.intervention, request, served)
    spec, layers = body.return_hidden_states, None
    points: tuple[int, ...] = ()
    encoded = 0  # the hidden states' bytes in the answer: base64 4/3 of the array, JSON lists up to 24 per number
    max_new = default_max_new(served, n_prompt, settings.default_max_new_tokens)
    if spec is not None:
        c = served.checkpoint.config
        layers, points = stream_points(spec, c.n_layer)
        n_bytes = (body.max_new_tokens or max_new) * len(points) * c.d_model * ITEMSIZE[spec.dtype]
        check_bytes(n_bytes, settings.hidden_states_max_bytes, "this generation")  # before it is queued
        encoded = n_bytes * 4 // 3 + 4 if spec.encoding == "base64" else n_bytes // ITEMSIZE[spec.dtype] * 24
    params = body.to_sampling_params(max_new, intervention, points)
    size = check_answer_size(request, served, [(params, 0)], repeat=2 if body.stream else 1, extra=encoded)
    handle, _ = submit(served, body.prompt, params)
    rid = f"gen-{uuid.uuid4().hex[:24]}"
    if not body.stream:
        [(tokens, fin)] = await collect(request, [handle])  # raises the API error of an abnormal finish
        if spec is not None:
            request.app.state.metrics.count_readout(served.name, "generate_hidden_states", _bytes(tokens, spec.dtype))
        return await json_answer(lambda: build_response(rid, served, tokens, fin, params, body, layers), size)

    async def events() -> AsyncIterator[str]:
        tokens: list[TokenEvent] = []
        async for ev in stream_events(handle):
            if isinstance(ev, TokenEvent):
                tokens.append(ev)
                data: dict[str, Any] = {
                    "type": "token",
                    "text": ev.text,
                    "token": token_info(ev).model_dump(exclude_none=True),
                }
                if ev.trace is not None:
                    data["trace"] = ev.trace
                if spec is not None and layers is not None and ev.stream is not None:
                    data["hidden_states"] = encode_one(
                        ev.stream.view(len(layers), len(spec.sites), -1), spec.encoding, spec.dtype
                    )
                yield sse("token", data)
                continue
            err = finish_error(ev)
            if err is not None:
                yield sse("error", error_body(err.status, err.message, err.param, err.code))
            else:
                if spec is not None:
                    request.app.state.metrics.count_readout(
                        served.name, "generate_hidden_states", _bytes(tokens, spec.dtype)
                    )
                done = build_response(rid, served, tokens, ev, params, body, layers)
                yield sse("done", {"type": "done", **done.model_dump(mode="json")})

    return sse_response(events())


def _bytes(tokens: list[TokenEvent], dtype: str) -> int:
    """The bytes of the tokens' vectors as answered."""
    return sum(t.stream.numel() for t in tokens if t.stream is not None) * ITEMSIZE[dtype]


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids (one per UTF-8 byte) of `text`, of vLLM's `prompt`, or of the prompt that chat `messages` become
    on /v1/chat/completions."""
    served = get_served(request, body.model)
    if body.messages is not None:
        text, _ = render_chat(request.app.state.settings.chat_template, body.messages, body.add_generation_prompt)
    else:
        text = body.text if body.text is not None else body.prompt or ""
    ids = tokenizer.encode(text)
    window = served.checkpoint.config.block_size
    strs = [tokenizer.token_text(i) for i in ids] if body.return_token_strs else None
    return TokenizeResponse(tokens=ids, count=len(ids), context_window=window, max_model_len=window, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """Text of token ids (invalid UTF-8 becomes U+FFFD), as `text` and as vLLM's `prompt`."""
    get_served(request, body.model)
    text = tokenizer.decode(body.tokens)
    return DetokenizeResponse(text=text, prompt=text)


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse)
async def tokenizer_info(request: Request) -> TokenizerInfoResponse:
    """The tokenizer as vLLM describes its own (what lm-evaluation-harness's remote tokenizer reads): bytes, no
    special tokens, the context window, the chat template."""
    served = get_served(request, None)
    return TokenizerInfoResponse(
        tokenizer_class="ByteTokenizer",
        vocab_size=tokenizer.VOCAB_SIZE,
        model_max_length=served.checkpoint.config.block_size,
        chat_template=jinja_template(request.app.state.settings.chat_template),
    )
