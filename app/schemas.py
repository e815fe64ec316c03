"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool
from pydantic_core import PydanticCustomError

from model.engine import MAX_LENS_TOP
from model.transformer import Intervention

MAX_SEED = 2**63 - 1


def json_number(value: object) -> object:
    """Only a JSON number is a number: pydantic's lax mode would also read true/false as 1/0 and "5" as 5."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("number_type", "Input should be a JSON number")
    return value


def not_a_bool(value: object) -> object:
    """Reject true/false for a number (query-string text such as "5" still parses)."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "Input should be a number, not a boolean")
    return value


def not_a_number(value: object) -> object:
    """Reject 0/1 for a boolean (query-string text such as "true" still parses)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "Input should be a valid boolean")
    return value


JsonNumber = BeforeValidator(json_number)
# constraints first: a validator placed before them would hide them from the JSON schema
Temperature = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False, description="0 = greedy"), JsonNumber]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False), JsonNumber]
TopK = Annotated[int, Field(ge=0, le=256, description="0 = off"), JsonNumber]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), JsonNumber]
MaxTokens = Annotated[int, Field(ge=1, le=65536), JsonNumber]
MAX_STOP_STRINGS, MAX_STOP_CHARS = 256, 1024  # schema caps; the engine's own limits (settings) are lower


def stop_shape(value: object) -> object:
    """One error for a bad `stop` (pydantic would report one per branch of `str | list[str]`)."""
    if value is None:
        return value
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise PydanticCustomError("stop_type", "Input should be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise PydanticCustomError("too_long", "at most {max} stop strings", {"max": MAX_STOP_STRINGS})
    if not all(1 <= len(s) <= MAX_STOP_CHARS for s in items):
        raise PydanticCustomError("string_length", "stop strings must be 1..{max} characters",
                                  {"max": MAX_STOP_CHARS})
    return value


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Annotated[StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None,
                 BeforeValidator(stop_shape)]
ModelName = Annotated[str, Field(min_length=1, max_length=64)]


MAX_INTERVENTION_ENTRIES = 1024  # a schema cap; the model's own limit (3 parts x n_layer, no repeats) is checked too
# Layer numbers, part names and factors are checked against the model by the engine: a 400 naming the entry.
LayerIndex = Annotated[int, JsonNumber]
PartName = Annotated[str, Field(max_length=16, description="block | attn | mlp")]


class SkipEntry(BaseModel):
    """Leave one part's F(x) out: the stream passes that part unchanged (the identity)."""

    model_config = ConfigDict(extra="forbid")
    layer: LayerIndex = Field(..., description="0-based layer")
    part: PartName


class ScaleEntry(BaseModel):
    """Multiply one part's F(x) by `factor` before it is added to the stream."""

    model_config = ConfigDict(extra="forbid")
    layer: LayerIndex = Field(..., description="0-based layer")
    part: PartName
    factor: Annotated[float, JsonNumber] = Field(..., description="finite, |factor| <= 100")


class InterventionSpec(BaseModel):
    """A per-request change to the residual stream, applied to the prompt and every generated token."""

    model_config = ConfigDict(extra="forbid")
    skip: list[SkipEntry] = Field(default_factory=list, max_length=MAX_INTERVENTION_ENTRIES)
    scale: list[ScaleEntry] = Field(default_factory=list, max_length=MAX_INTERVENTION_ENTRIES)

    def to_engine(self) -> Intervention | None:
        """The engine's form (None when empty: nothing changes)."""
        if not self.skip and not self.scale:
            return None
        return Intervention(skip=tuple((e.layer, e.part) for e in self.skip),
                            scale=tuple((e.layer, e.part, e.factor) for e in self.scale))


class LensToken(BaseModel):
    id: int
    text: str
    prob: float


class TokenTrace(BaseModel):
    """The residual stream at the position that produced a token."""

    position: int = Field(..., description="0-based position in prompt + generated tokens")
    resid_norm: list[float] = Field(..., description="per layer: L2 norm of resid_post")
    update_ratio: list[float] = Field(..., description="per layer: |resid_post - resid_pre| / |resid_pre|")
    logit_lens: list[list[LensToken]] | None = Field(None, description="per layer: the logit lens's top tokens")


class Trace(BaseModel):
    tokens: list[TokenTrace] = Field(..., description="one per generated token, in order")


class GenerateRequest(BaseModel):
    """Body of POST /generate."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, description="text to continue (UTF-8; one token per byte)")
    model: ModelName | None = Field(None, description="served model name; default the main model")
    max_new_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    stop: Stop = None
    seed: Seed | None = None
    logprobs: Annotated[int, Field(ge=0, le=256, description="top alternatives per token; 0 = none"), JsonNumber] = 0
    stream: StrictBool = False
    intervention: InterventionSpec | None = Field(None, description="skip or scale blocks' F(x) for this request")
    trace: StrictBool = Field(False, description="per token: resid_post norm and update ratio of every layer")
    logit_lens_top: Annotated[int, Field(ge=0, le=MAX_LENS_TOP), JsonNumber] = Field(
        0, description="per token and layer: the logit lens's top-K tokens (implies trace)")


class TopLogprob(BaseModel):
    id: int
    text: str
    logprob: float


class TokenInfo(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[TopLogprob] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    intervention: InterventionSpec | None = Field(None, description="the intervention applied, if any")
    trace: Trace | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(..., max_length=1_000_000)
    model: ModelName | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    context_window: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[Annotated[int, Field(ge=0, le=255), JsonNumber]] = Field(..., max_length=1_000_000)
    model: ModelName | None = None


class DetokenizeResponse(BaseModel):
    text: str


# ---- OpenAI-compatible ---------------------------------------------------------------------------


class CompletionRequest(BaseModel):
    """Body of POST /v1/completions (the subset that applies to this server)."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName | None = None
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: MaxTokens | None = 16
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    top_k: TopK | None = None
    n: Literal[1] = 1
    stream: StrictBool = False
    logprobs: Annotated[int, Field(ge=0, le=20), JsonNumber] | None = None
    stop: Stop = None
    seed: Seed | None = None
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    stream_options: dict | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shortcut"
    n_layer: int
    d_model: int
    context_window: int
    residual: bool
    checkpoint_sha256: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error has this shape."""

    error: ErrorDetail
