"""Request and response bodies of the native API: /generate, /tokenize and /detokenize.

(OpenAI's /v1 has its own, in app.openai.protocol; both build the engine's parameters with
app.sampling.build_sampling_params.)
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator
from pydantic.json_schema import SkipJsonSchema

from app.openai.protocol import Messages
from app.readout_protocol import GeneratedHiddenStates, ReturnHiddenStates
from app.sampling import build_sampling_params, stop_tuple
from app.schemas import (
    MAX_TOKEN_IDS,
    ByteId,
    InterventionEcho,
    InterventionSpec,
    JsonNumber,
    LogitBias,
    MaxTokens,
    MinP,
    ModelName,
    Penalty,
    RepetitionPenalty,
    Seed,
    Stop,
    Temperature,
    TopK,
    TopP,
    Trace,
    Usage,
    first_problem,
    int_in,
    to_engine,
)
from model.edits import Intervention
from model.engine import MAX_LENS_TOP, SamplingParams


class GenerateRequest(BaseModel):
    """Body of POST /generate."""

    model_config = ConfigDict(extra="forbid")

    # OpenAI's (/v1's) names that /generate spells otherwise or does not take: the 422 says what to send instead
    FIELD_HINTS: ClassVar[dict[str, str]] = {
        "max_tokens": "this route's field is max_new_tokens (max_tokens is /v1's name)",
        "max_completion_tokens": "this route's field is max_new_tokens (max_completion_tokens is /v1's name)",
        "n": "/generate makes one continuation per request; for n choices use /v1/completions",
        "best_of": "/generate makes one continuation per request; for several use /v1/completions with n",
        "echo": "/generate answers only the new text; for the prompt's logprobs use /v1/completions with echo",
        "top_logprobs": "this route's field is logprobs: K (K alternatives per token)",
        "messages": "/generate continues a prompt; for messages use /v1/chat/completions",
        "stream_options": "/generate's final `done` event always carries usage; send stream: true only",
        "stop_strings": "this route's field is stop (a string or a list of strings)",
    }

    prompt: str = Field(..., min_length=1, description="text to continue (UTF-8; one token per byte)")
    model: ModelName | None = Field(None, description="served model name; default the main model")
    max_new_tokens: MaxTokens | None = Field(
        None, description="omitted or null: SHORTCUT_DEFAULT_MAX_NEW_TOKENS, capped by what the context window leaves"
    )
    # never null: each knob's default is the engine's neutral value, as a null is on /v1
    temperature: Temperature = 1.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    stop: Stop = None
    seed: Seed | None = None
    logprobs: Annotated[int, Field(ge=0, le=256, description="top alternatives per token; 0 = none"), JsonNumber] = 0
    stream: StrictBool = False
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    min_p: MinP = 0.0
    logit_bias: LogitBias | None = None
    intervention: InterventionSpec | None = Field(
        None, description="skip or scale blocks' F(x), or add steering vectors, for this request"
    )
    trace: StrictBool = Field(False, description="per token: resid_post norm and update ratio of every layer")
    logit_lens_top: Annotated[int, Field(ge=0, le=MAX_LENS_TOP), JsonNumber] = Field(
        0, description="per token and layer: the logit lens's top-K tokens (implies trace)"
    )
    lens: Literal["logit", "tuned"] = Field(
        "logit", description="which lens logit_lens_top reads: the logit lens, or the model's tuned lens"
    )
    return_hidden_states: ReturnHiddenStates | None = Field(
        None,
        description="per token: the residual stream's vectors (resid_pre, resid_post) at the position that produced "
        "it, from the same forward; capped by SHORTCUT_HIDDEN_STATES_MAX_BYTES",
    )

    def to_sampling_params(
        self,
        default_max_new_tokens: int,
        intervention: Intervention | None = None,
        return_stream: tuple[int, ...] = (),
    ) -> SamplingParams:
        """The engine's parameters; `default_max_new_tokens` is what an omitted max_new_tokens becomes (the
        setting, capped by what the window leaves the prompt). `intervention`: this request's, resolved
        (app.steering_lookup.resolve: named vectors looked up, checked against the model); omitted, it is converted
        here without named vectors. `return_stream`: the points of the stream `return_hidden_states` asks for
        (app.readout_protocol.stream_points, which checks them against the model)."""
        return build_sampling_params(
            max_new_tokens=self.max_new_tokens or default_max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop=stop_tuple(self.stop),
            seed=self.seed,
            logprobs=self.logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_p=self.min_p,
            logit_bias=self.logit_bias,
            intervention=intervention if intervention is not None else to_engine(self.intervention),
            trace=self.trace,
            logit_lens_top=self.logit_lens_top,
            lens=self.lens,
            return_stream=return_stream,
        )


class TopLogprob(BaseModel):
    id: int
    text: str
    logprob: float


class TokenInfo(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[TopLogprob] | None = None


class Timings(BaseModel):
    queue_s: float
    ttft_s: float | None
    total_s: float


class GenerateResponse(BaseModel):
    """Body of a non-streaming /generate answer (and of the final streamed event)."""

    id: str
    model: str
    text: str
    finish_reason: Literal["length", "stop", "abort", "timeout", "error"]
    usage: Usage
    tokens: list[TokenInfo] | None = None
    timings: Timings
    seed: int
    checkpoint_sha256: str
    intervention: InterventionEcho | None = Field(None, description="the intervention applied, if any")
    trace: Trace | None = None
    hidden_states: GeneratedHiddenStates | None = Field(None, description="with return_hidden_states")


class TokenizeRequest(BaseModel):
    """Body of POST /tokenize: this server's `text`, or vLLM's `prompt` (with `add_special_tokens`) or chat
    `messages` (rendered with SHORTCUT_CHAT_TEMPLATE, as /v1/chat/completions renders them); exactly one."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["prompt"]}, {"required": ["messages"]}]},
    )
    text: Annotated[str, Field(max_length=1_000_000)] | SkipJsonSchema[None] = None
    prompt: Annotated[str, Field(max_length=1_000_000)] | SkipJsonSchema[None] = Field(
        None, description="vLLM's name for `text`"
    )
    messages: Messages | SkipJsonSchema[None] = Field(
        None, description="vLLM's chat form: the prompt /v1/chat/completions would build from these messages"
    )
    add_special_tokens: StrictBool = Field(
        False, description="accepted for vLLM's clients; a byte tokenizer has no special tokens, so it changes nothing"
    )
    add_generation_prompt: StrictBool = Field(True, description="with `messages`: end with the assistant's open turn")
    return_token_strs: StrictBool = Field(False, description="also return each token's text (vLLM's `token_strs`)")
    model: ModelName | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        given = [k for k in ("text", "prompt", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of text, prompt (vLLM's name for text) or messages"
                + (f"; got {' and '.join(given)}" if given else "")
            )
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    context_window: int
    max_model_len: int = Field(..., description="vLLM's name for context_window")
    token_strs: list[str] | None = Field(None, description="each token's text, with return_token_strs")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: Annotated[list[ByteId], Field(max_length=MAX_TOKEN_IDS), first_problem(MAX_TOKEN_IDS, int_in(0, 255), int)]
    model: ModelName | None = None


class DetokenizeResponse(BaseModel):
    text: str
    prompt: str = Field(..., description="the same text under vLLM's name")


class TokenizerInfoResponse(BaseModel):
    """GET /tokenizer_info: vLLM's fields (a tokenizer_config.json) that apply to a byte tokenizer."""

    tokenizer_class: str = Field(..., description="'ByteTokenizer': one token per UTF-8 byte, ids 0..255")
    vocab_size: int
    model_max_length: int = Field(..., description="the context window in tokens (bytes)")
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str = Field(..., description="SHORTCUT_CHAT_TEMPLATE as a Jinja template, as vLLM serves it")
