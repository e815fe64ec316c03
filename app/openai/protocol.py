"""OpenAI's /v1 request and response bodies, what each request refuses, and its engine parameters.

Every field of OpenAI's requests is either served or refused with a 400 `unsupported_parameter` (unless it holds the
value that changes nothing, e.g. `suffix: null`); unknown fields are refused the same way (app.openai.not_served
holds the tables). The request models keep unknown fields (extra="allow") so that `check` can name them in the 400.

Null defaults: a null sampling knob (temperature, top_p, top_k, min_p, the penalties) is the engine's neutral
value, as OpenAI documents for its own; a null max_tokens is 16 on /v1/completions (OpenAI's default) and
SHORTCUT_DEFAULT_MAX_NEW_TOKENS on /v1/chat/completions, both capped by what the context window leaves.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from app.errors import APIError
from app.openai.not_served import MESSAGE_NOT_SERVED, NO_TOOLS, NOT_SERVED, refuse_extra, unsupported
from app.sampling import build_sampling_params, stop_tuple
from app.schemas import (
    MAX_TOKEN_IDS,
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
    Usage,
    Utf8Only,
    first_problem,
    int_in,
    to_engine,
)
from model import tokenizer
from model.edits import Intervention
from model.engine import MAX_LENS_TOP, MAX_SEED, SamplingParams


def _is_dict(v: object) -> bool:
    return type(v) is dict


def choice_seed(seed: int | None, i: int) -> int | None:
    """The seed of choice `i`: `seed` itself for choice 0, else the first 63 bits of sha256(f"{seed}:{i}")."""
    if seed is None or i == 0:
        return seed
    return (int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") >> 1) & MAX_SEED


class StreamOptions(BaseModel):
    """`stream_options`: OpenAI's fields (unknown ones are refused with a 400 by the route)."""

    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None


class OpenAIRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions.

    Unknown fields are kept (extra="allow") so that the route can refuse them with a 400 `unsupported_parameter`
    that names the field and says what to use instead, as it does for OpenAI fields this server does not serve.
    """

    model_config = ConfigDict(extra="allow")

    model: ModelName | None = None
    # a null knob is its neutral value (build_sampling_params): temperature and top_p 1, penalties, top_k, min_p off
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    n: (
        Annotated[int, Field(ge=1, le=1024, description="choices per prompt (at most SHORTCUT_MAX_N)"), JsonNumber]
        | None
    ) = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: LogitBias | None = None
    user: Annotated[str, Field(max_length=256)] | None = Field(None, description="logged only, as in OpenAI")
    # vendor extensions (as in vLLM, plus this server's own)
    top_k: TopK | None = Field(None, description="extension; 0 = off")
    min_p: MinP | None = Field(None, description="extension; 0 = off")
    repetition_penalty: RepetitionPenalty | None = Field(None, description="extension; 1 = off")
    intervention: InterventionSpec | None = Field(
        None,
        description="extension, as on /generate: skip or scale blocks' F(x), add steering vectors, for every choice",
    )
    trace: StrictBool = Field(False, description="extension, as on /generate: each choice carries `trace`")
    logit_lens_top: Annotated[int, Field(ge=0, le=MAX_LENS_TOP), JsonNumber] = Field(
        0, description="extension, as on /generate (implies trace)"
    )
    lens: Literal["logit", "tuned"] = Field("logit", description="extension, as on /generate: logit_lens_top's lens")

    def check(self, max_n: int) -> int:
        """Refuse what is not served (400 `unsupported_parameter`) and an `n` over `max_n`; return n."""
        refuse_extra(self.model_extra, NOT_SERVED)
        if self.stream_options is not None:
            if not self.stream:
                raise APIError(
                    400,
                    "stream_options is only allowed with stream: true",
                    param="stream_options",
                    code="invalid_value",
                )
            refuse_extra(self.stream_options.model_extra, {}, "stream_options.")
            if self.stream_options.include_obfuscation:
                raise unsupported("stream_options.include_obfuscation", "stream obfuscation is not served")
        n = self.n or 1
        if n > max_n:
            raise APIError(400, f"n must be at most {max_n} (SHORTCUT_MAX_N)", param="n", code="invalid_value")
        return n

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(
        self,
        max_tokens: int,
        choice: int,
        logprobs: int | None,
        stop: tuple[str, ...],
        intervention: Intervention | None,
    ) -> SamplingParams:
        return build_sampling_params(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop=stop,
            seed=choice_seed(self.seed, choice),
            logprobs=0 if logprobs is None else max(logprobs, 1),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_p=self.min_p,
            logit_bias=self.logit_bias,
            intervention=intervention if intervention is not None else to_engine(self.intervention),
            trace=self.trace,
            logit_lens_top=self.logit_lens_top,
            lens=self.lens,
        )


TOKEN_ID_MAX = 2**31
TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX), JsonNumber]
MAX_PROMPTS_SCHEMA = 1024  # the served limit is SHORTCUT_MAX_PROMPTS
_token_id = int_in(0, TOKEN_ID_MAX)  # ids over 255 pass the schema and get a 400 naming the byte range (prompts())
PROMPT_SHAPES = "a prompt is a string, a list of strings, a list of token ids or a list of lists of token ids"


def _first_bad_id(ids: list[Any]) -> int | None:
    """Index of the first item of `ids` that is not a token id, or None (at C speed when all are integers)."""
    if set(map(type, ids)) <= {int} and 0 <= min(ids) and max(ids) <= TOKEN_ID_MAX:
        return None
    return next((j for j, t in enumerate(ids) if not _token_id(t)), None)


def _prompt_error(message: str, **context: object) -> PydanticCustomError:
    return PydanticCustomError("prompt_type", message + "; " + PROMPT_SHAPES, context)


def prompt_shape(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One error for a bad `prompt`, at its first problem, before pydantic tries the union's branches (it would
    validate every item of each branch and report every bad one: ~240,000 errors, seconds of event loop, for a 1 MB
    list of bad ids). Token ids that pass the quick check are taken as they are (pydantic's per-item validation of
    65,536 ids alone is ~0.1 s)."""
    if not isinstance(value, list) or not value:
        return handler(value)  # a string, or an error pydantic reports once per branch
    first = value[0]
    if isinstance(first, str | list):
        if len(value) > MAX_PROMPTS_SCHEMA:
            raise _prompt_error("at most {max} prompts in one request", max=MAX_PROMPTS_SCHEMA)
        if isinstance(first, str):
            bad = next((i for i, item in enumerate(value) if not isinstance(item, str)), None)
            if bad is not None:
                raise _prompt_error("item {index} should be a string, as item 0 is", index=bad)
            return handler(value)
        for i, item in enumerate(value):
            if not isinstance(item, list) or not 1 <= len(item) <= MAX_TOKEN_IDS:
                raise _prompt_error("item {index} should be a list of 1..{max} token ids", index=i, max=MAX_TOKEN_IDS)
            bad = _first_bad_id(item)
            if bad is not None:
                raise _prompt_error("item {index}.{bad} should be a token id (an integer >= 0)", index=i, bad=bad)
        return [[int(t) for t in item] for item in value]
    if len(value) > MAX_TOKEN_IDS:
        raise _prompt_error("at most {max} token ids in a prompt", max=MAX_TOKEN_IDS)
    bad = _first_bad_id(value)
    if bad is not None:
        raise _prompt_error("item {index} should be a token id (an integer >= 0), as item 0 is", index=bad)
    return [int(t) for t in value]


class CompletionRequest(OpenAIRequest):
    """Body of POST /v1/completions."""

    prompt: Annotated[
        (
            str
            | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS_SCHEMA)]
            | Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKEN_IDS)]
            | Annotated[
                list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKEN_IDS)]],
                Field(min_length=1, max_length=MAX_PROMPTS_SCHEMA),
            ]
        ),
        Utf8Only,
        WrapValidator(prompt_shape),
    ]
    max_tokens: Annotated[int, Field(ge=0, le=65536), JsonNumber] | None = Field(
        None,
        description="omitted or null: 16 (OpenAI's default), capped by what the context window leaves; 0 only with "
        "echo: the prompt scored, nothing generated (a whole context window fits)",
    )
    logprobs: Annotated[int, Field(ge=0, le=20), JsonNumber] | None = None
    echo: StrictBool | None = False
    best_of: Annotated[int, Field(ge=1), JsonNumber] | None = None

    DEFAULT_MAX_TOKENS: ClassVar[int] = 16  # OpenAI's documented default for an omitted or null max_tokens

    def check(self, max_n: int) -> int:
        """As OpenAIRequest.check, and best_of other than n is refused."""
        n = super().check(max_n)
        if self.max_tokens == 0 and not self.echo:
            raise APIError(
                400,
                "max_tokens: 0 generates nothing, so it is only allowed with echo: true (which returns the prompt, "
                "scored with logprobs if asked); send max_tokens >= 1 to generate",
                param="max_tokens",
                code="invalid_value",
            )
        if self.best_of not in (None, 1, n):
            raise unsupported("best_of", "best_of > n is not served; ask for n choices with logprobs and rank them")
        return n

    def prompts(self, limit: int) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt; `prompt` may be a string, strings, token ids or lists of token ids."""
        p = self.prompt
        prompts: list[str | list[int]] = []
        if isinstance(p, str):
            prompts.append(p)
        elif p and isinstance(p[0], int):
            prompts.append(p)  # one prompt of token ids
        else:
            prompts.extend(p)  # type: ignore[arg-type]  # strings, or lists of token ids
        if len(prompts) > limit:
            raise APIError(
                400, f"at most {limit} prompts per request (SHORTCUT_MAX_PROMPTS)", param="prompt", code="invalid_value"
            )
        out = []
        for q in prompts:
            if isinstance(q, str):
                out.append((tokenizer.encode(q), q))
            elif any(not 0 <= t < tokenizer.VOCAB_SIZE for t in q):
                raise APIError(
                    400,
                    f"token ids must be in 0..{tokenizer.VOCAB_SIZE - 1} (one per byte)",
                    param="prompt",
                    code="invalid_value",
                )
            else:
                out.append((list(q), tokenizer.decode(q)))
        return out

    @property
    def score_only(self) -> bool:
        """max_tokens 0 with echo: the prompts are scored, nothing is generated."""
        return self.max_tokens == 0 and bool(self.echo)

    def to_sampling_params(
        self, default_max_tokens: int, choice: int = 0, intervention: Intervention | None = None
    ) -> SamplingParams:
        """Engine parameters of choice `choice` (its own seed); `default_max_tokens` is what an omitted max_tokens
        becomes for this prompt (DEFAULT_MAX_TOKENS, capped by the window); `intervention`: the request's, resolved
        (app.steering_lookup.resolve; omitted: converted here without named vectors)."""
        return self._sampling_params(
            self.max_tokens or default_max_tokens, choice, self.logprobs, stop_tuple(self.stop), intervention
        )


MAX_CONTENT_PARTS = 1024  # text parts in one message
MAX_MESSAGES = 1024
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for a message's name


class ChatMessage(BaseModel):
    """One message; `name` is the speaker's name in the rendered play script."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[
        str
        | Annotated[
            list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS), first_problem(MAX_CONTENT_PARTS, _is_dict)
        ]
        | None,
        Utf8Only,
    ] = None
    name: (
        Annotated[str, Field(pattern=NAME_PATTERN, description="letters, digits, _ and -; 1..64 characters")] | None
    ) = None

    def text(self, i: int) -> str:
        """The content as text (text parts joined with a newline, as vLLM does), after refusing what is not
        served; `i` is the message's index, for the error's param."""
        if self.role in ("tool", "function"):
            raise unsupported(f"messages.{i}.role", NO_TOOLS)
        refuse_extra(self.model_extra, MESSAGE_NOT_SERVED, f"messages.{i}.")
        if self.content is None:
            raise APIError(
                400,
                f"messages.{i}.content: a message needs content",
                param=f"messages.{i}.content",
                code="invalid_value",
            )
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise unsupported(f"messages.{i}.content", "only text parts ({'type': 'text', 'text': ...}) are served")
            texts.append(part["text"])
        return "\n".join(texts)


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES), first_problem(MAX_MESSAGES)]


class ChatCompletionRequest(OpenAIRequest):
    """Body of POST /v1/chat/completions."""

    messages: Messages
    safety_identifier: Annotated[str, Field(max_length=256)] | None = Field(None, description="logged only")
    max_completion_tokens: MaxTokens | None = None
    max_tokens: MaxTokens | None = Field(
        None,
        description="deprecated alias of max_completion_tokens; omitted or "
        "null: SHORTCUT_DEFAULT_MAX_NEW_TOKENS, capped by the "
        "window",
    )
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20), JsonNumber] | None = None

    def check(self, max_n: int) -> int:
        """As OpenAIRequest.check, and top_logprobs needs logprobs, and max_tokens may only repeat
        max_completion_tokens."""
        n = super().check(max_n)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise APIError(
                400,
                "max_tokens is a deprecated alias of max_completion_tokens; give one of them",
                param="max_tokens",
                code="invalid_value",
            )
        return n

    @property
    def top_k_logprobs(self) -> int | None:
        """How many alternatives each token's logprobs list; None without logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_tokens_param(self) -> str:
        """The field an error about the length names: the one the client gave."""
        return "max_tokens" if self.max_tokens else "max_completion_tokens"

    def to_sampling_params(
        self, default_max_tokens: int, turn_end: str, choice: int = 0, intervention: Intervention | None = None
    ) -> SamplingParams:
        """Engine parameters of choice `choice` (its own seed); `default_max_tokens` is what omitted max tokens
        become (SHORTCUT_DEFAULT_MAX_NEW_TOKENS, capped by the window); the reply also stops at `turn_end`;
        `intervention`: the request's, resolved (app.steering_lookup.resolve)."""
        stop = tuple(dict.fromkeys((turn_end, *stop_tuple(self.stop))))
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return self._sampling_params(max_tokens, choice, self.top_k_logprobs, stop, intervention)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for the first prompt token with echo (nothing predicts it)
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # `trace`, an extension, only when it was asked for
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")  # `intervention`, an extension, only when one was applied
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # `trace`, an extension, only when it was asked for
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")  # `intervention`, an extension, only when one was applied
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shortcut"
    root: str = Field(..., description="the served model (for an alias from SHORTCUT_MODEL_ALIASES, its target)")
    n_layer: int
    d_model: int
    context_window: int
    residual: bool
    checkpoint_sha256: str
    tuned_lens: bool = Field(
        False, description="the model has a tuned lens: /diagnostics' tuned_lens and the trace's lens \"tuned\""
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
