"""What the HTTP API's bodies share: JSON field types and their validators, the intervention, the trace, usage,
the error shape, and the documented /diagnostics answer.

Each API's own request and response bodies live with it: /generate, /tokenize and /detokenize in app.protocol,
OpenAI's /v1 in app.openai.protocol."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_serializer,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from model.edits import MAX_COEFF, Intervention, VectorAdd
from model.engine import MAX_SEED, InvalidRequestError


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


def utf8_only(value: object) -> object:
    """Refuse text with lone surrogates (it has no UTF-8 form), in a string, a list of strings or the string values of
    a list of objects (chat content parts). A plain `str` field already does; inside a union (`str | list[str]`) or
    a `dict[str, Any]` pydantic lets them through."""
    for item in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        for text in [*item, *item.values()] if isinstance(item, dict) else [item]:
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise PydanticCustomError(
                    "string_unicode", "Input should be a valid string, unable to parse raw data as a unicode string"
                ) from None
    return value


JsonNumber = BeforeValidator(json_number)
Utf8Only = BeforeValidator(utf8_only)


def too_long(max_length: int, actual: int) -> PydanticCustomError:
    """Pydantic's own error for a list over its max_length."""
    return PydanticCustomError(
        "too_long",
        "List should have at most {max_length} items, not {actual_length}",
        {"max_length": max_length, "actual_length": actual},
    )


def first_problem(
    max_length: int, quick_ok: Callable[[Any], bool] | None = None, convert: Callable[[Any], Any] | None = None
) -> WrapValidator:
    """For a list field (placed after its `Field(max_length=...)`): its length checked first, then a refusal at the
    first bad item with only that item's errors. Pydantic validates items up to max_length + 1 before it looks at the
    length, and builds one error per bad item (a 1 MB body of bad ids: ~200,000 errors, seconds of event loop).

    Items that pass `quick_ok` (a cheap check that implies pydantic accepts the item) are not validated one by one;
    the others (every item without `quick_ok`) are validated alone, and the first that fails is the error, at its
    index. When every item passes `quick_ok` and `convert` is given, the list is `convert` of each item, without
    pydantic's per-item validators (what it would return: e.g. `float` for a float field given ints)."""

    def first_problem(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, list):
            return handler(value)
        if len(value) > max_length:
            raise too_long(max_length, len(value))
        quick = quick_ok is not None
        for i, item in enumerate(value):
            if quick_ok is not None and quick_ok(item):
                continue
            quick = False
            try:
                handler([item])
            except ValidationError as e:
                raise item_error(e, i) from None
        if quick and convert is not None and value:
            return [convert(v) for v in value]
        return handler(value)

    return WrapValidator(first_problem)


MAX_ITEM_ERRORS = 4  # errors reported for the first bad item of a list (a bad object can have several)


def item_error(e: ValidationError, index: int) -> ValidationError:
    """`e`, raised for a list holding one item, as the error of the item at `index` (its first few problems)."""
    details: list[InitErrorDetails] = [
        {
            "type": PydanticCustomError(err["type"], err["msg"]),
            "loc": (index, *err["loc"][1:]) if err["loc"][:1] == (0,) else err["loc"],
            "input": err["input"],
        }
        for err in e.errors(include_url=False)[:MAX_ITEM_ERRORS]
    ]
    return ValidationError.from_exception_data(e.title, details)


def int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    """A quick check for `first_problem`: a JSON integer (or integral number) in lo..hi."""
    return lambda v: (type(v) is int or (type(v) is float and v.is_integer())) and lo <= v <= hi


def finite_number(v: Any) -> bool:
    """A quick check for `first_problem`: a finite JSON number (a float's range)."""
    return (type(v) is float and math.isfinite(v)) or (type(v) is int and -(2**53) <= v <= 2**53)


def utf8_text(v: Any) -> bool:
    """A quick check for `first_problem`: a non-empty string with a UTF-8 form."""
    if type(v) is not str or not v:
        return False
    if v.isascii():
        return True
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def any_number(v: Any) -> bool:
    """A quick check for `first_problem`: a JSON number, infinities and NaN included (a float field that takes
    them)."""
    return type(v) is float or (type(v) is int and -(2**53) <= v <= 2**53)


# constraints first: a validator placed before them would hide them from the JSON schema
Temperature = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False, description="0 = greedy"), JsonNumber]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False), JsonNumber]
TopK = Annotated[int, Field(ge=0, le=256, description="0 = off"), JsonNumber]
# The schema advertises 2**63 - 1024, the largest double not above MAX_SEED: a client (or a fuzzer) that reads the
# bound as a JSON number never gets an integer above MAX_SEED past it (2**63 - 1 itself rounds up to 2**63).
SEED_SCHEMA_MAX = 2**63 - 1024
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, json_schema_extra={"maximum": SEED_SCHEMA_MAX}), JsonNumber]
MaxTokens = Annotated[int, Field(ge=1, le=65536), JsonNumber]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False, description="0 = off"), JsonNumber]
RepetitionPenalty = Annotated[float, Field(gt=0.0, allow_inf_nan=False, description="1 = off"), JsonNumber]
MinP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, description="0 = off"), JsonNumber]
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,6}$")]
BiasValue = Annotated[float, Field(allow_inf_nan=False, description="clamped to -100..100"), JsonNumber]
LogitBias = Annotated[
    dict[TokenIdKey, BiasValue],
    Field(
        max_length=1024,
        description="token id (as a string) -> bias added to its logit, clamped to -100..100",
        json_schema_extra={"additionalProperties": False},
    ),
]  # keys are only the pattern's
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
        raise PydanticCustomError("string_length", "stop strings must be 1..{max} characters", {"max": MAX_STOP_CHARS})
    return value


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Annotated[
    StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None, BeforeValidator(stop_shape)
]
ModelName = Annotated[str, Field(min_length=1, max_length=64)]
# A schema cap on a list of token ids, above any served context window (each route checks the model's own window)
MAX_TOKEN_IDS = 65536
ByteId = Annotated[int, Field(ge=0, le=255), JsonNumber]
ByteIds = Annotated[
    list[ByteId], Field(min_length=1, max_length=MAX_TOKEN_IDS), first_problem(MAX_TOKEN_IDS, int_in(0, 255), int)
]


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


MAX_ADD_ENTRIES = 64  # steering vectors per request (they sum where they share a layer)
MAX_VECTOR_LENGTH = 16384  # numbers in an inline vector, before the model's own d_model is checked
VECTOR_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
# name -> float32 (d_model,) tensor; `field` is the entry's name field, for the 400 it raises (app.steering_lookup)
VectorLookup = Callable[[str, str], torch.Tensor]


class _AddEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: LayerIndex = Field(..., description="0-based layer: the vector is added after this block")
    coeff: Annotated[float, JsonNumber] = Field(1.0, description=f"finite, |coeff| <= {MAX_COEFF:g}")
    positions: str = Field(
        "all", max_length=16, description="all | prompt | generated: every position, the prompt's, the generated ones"
    )


class AddVector(_AddEntry):
    """Add `coeff * vector` to the residual stream after block `layer` (its resid_post) at `positions`."""

    vector: Annotated[
        list[Annotated[float, JsonNumber]],
        Field(max_length=MAX_VECTOR_LENGTH),
        first_problem(MAX_VECTOR_LENGTH, any_number, float),
    ] = Field(..., description="d_model numbers")


class AddNamed(_AddEntry):
    """Add `coeff` times the stored vector `name` (/steering/vectors) after block `layer` at `positions`."""

    name: str = Field(..., pattern=VECTOR_NAME_PATTERN, description="a stored vector's name")


# exactly one of vector and name: two shapes, each refusing the other's field (so the JSON schema says it too)
AddEntry = AddVector | AddNamed


class InterventionSpec(BaseModel):
    """A per-request change to the residual stream, applied to the prompt and every generated token (vectors at the
    positions they name)."""

    model_config = ConfigDict(extra="forbid")
    skip: Annotated[
        list[SkipEntry], Field(max_length=MAX_INTERVENTION_ENTRIES), first_problem(MAX_INTERVENTION_ENTRIES)
    ] = Field(default_factory=list)
    scale: Annotated[
        list[ScaleEntry], Field(max_length=MAX_INTERVENTION_ENTRIES), first_problem(MAX_INTERVENTION_ENTRIES)
    ] = Field(default_factory=list)
    add: Annotated[list[AddEntry], Field(max_length=MAX_ADD_ENTRIES), first_problem(MAX_ADD_ENTRIES)] = Field(
        default_factory=list
    )

    def to_engine(self, lookup: VectorLookup | None = None) -> Intervention | None:
        """The engine's form (None when empty: nothing changes). Named vectors come from `lookup` (called with the
        name and the entry's field, it raises the API's error); without one a named vector is a 400 at its field.
        Use app.steering_lookup.resolve, which also checks the result against the model."""
        if not self.skip and not self.scale and not self.add:
            return None
        adds = []
        for i, e in enumerate(self.add):
            if isinstance(e, AddNamed):
                field = f"intervention.add[{i}].name"
                if lookup is None:
                    raise InvalidRequestError(f"{field}: named steering vectors are not available here", field)
                adds.append(VectorAdd.of(e.layer, lookup(e.name, field), e.coeff, e.positions, name=e.name))
            else:
                adds.append(VectorAdd.of(e.layer, e.vector, e.coeff, e.positions))
        return Intervention(
            skip=tuple((e.layer, e.part) for e in self.skip),
            scale=tuple((e.layer, e.part, e.factor) for e in self.scale),
            add=tuple(adds),
        )


def to_engine(spec: InterventionSpec | None) -> Intervention | None:
    """`spec.to_engine()` without named vectors (None for no spec): what a request model converts when its route
    did not resolve the intervention (app.steering_lookup.resolve)."""
    return spec.to_engine() if spec is not None else None


class VectorEcho(BaseModel):
    norm: float = Field(..., description="L2 norm of the inline vector (before coeff)")
    sha256: str = Field(..., description="first 12 hex digits of the sha256 of its float32 bytes (little-endian)")


class AddEcho(BaseModel):
    """An added vector as echoed: by name, or an inline one by its norm and short hash (never the numbers)."""

    layer: int
    name: str | None = None
    vector: VectorEcho | None = None
    coeff: float
    positions: str

    @model_serializer(mode="wrap")
    def _one_source(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        out: dict[str, object] = handler(self)
        return {k: v for k, v in out.items() if v is not None or k not in ("name", "vector")}


class InterventionEcho(BaseModel):
    """The intervention applied, as answers echo it (`add` only when vectors were added)."""

    skip: list[SkipEntry]
    scale: list[ScaleEntry]
    add: list[AddEcho] | None = None

    @model_serializer(mode="wrap")
    def _without_empty_add(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        out: dict[str, object] = handler(self)
        if out.get("add") is None:
            out.pop("add", None)  # an intervention without vectors echoes as it did before they existed
        return out


class LensToken(BaseModel):
    id: int
    text: str
    prob: float


class TokenTrace(BaseModel):
    """The residual stream at the position that produced a token."""

    position: int = Field(..., description="0-based position in prompt + generated tokens")
    resid_norm: list[float] = Field(..., description="per layer: L2 norm of resid_post")
    update_ratio: list[float] = Field(..., description="per layer: |resid_post - resid_pre| / |resid_pre|")
    logit_lens: list[list[LensToken]] | None = Field(
        None, description="per layer: the top tokens of the lens named by `lens` (logit_lens_top=K)"
    )
    lens: Literal["logit", "tuned"] | None = Field(None, description="which lens `logit_lens` read, when present")


class Trace(BaseModel):
    tokens: list[TokenTrace] = Field(..., description="one per generated token, in order")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error has this shape."""

    error: ErrorDetail


# ---- /diagnostics (documents the JSON that model.diagnostics builds; a test validates real results against it)

Stat = float | None  # None only where the model itself overflowed


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NormStats(_Strict):
    mean: Stat
    max: Stat
    first: Stat = Field(..., description="at position 0 (often an attention sink)")
    per_token: list[Stat] | None = Field(None, description="with per_token=true")


class UpdateRatios(_Strict):
    attn: Stat = Field(..., description="|attn_out| / |resid_pre|, mean over positions")
    mlp: Stat = Field(..., description="|mlp_out| / |resid_mid|")
    block: Stat = Field(..., description="|resid_post - resid_pre| / |resid_pre|")
    per_token: dict[Literal["attn", "mlp", "block"], list[Stat]] | None = Field(None, description="per_token=true")


class LogitLensTop(_Strict):
    id: int
    text: str
    prob: Stat


class LogitLensLayer(_Strict):
    top: list[LogitLensTop]
    entropy: Stat
    kl_to_final: Stat = Field(..., description="KL(final || this layer) at the last position")


class DeltaLoss(_Strict):
    block: Stat
    attn: Stat
    mlp: Stat


class LayerDiagnostics(_Strict):
    layer: int
    intervened: bool = Field(..., description="the request's intervention touches this layer")
    resid_pre: NormStats
    attn_out: NormStats
    resid_mid: NormStats
    mlp_out: NormStats
    resid_post: NormStats
    update_ratio: UpdateRatios
    cos_update: Stat
    block_influence: Stat = Field(..., description="1 - cos(resid_pre, resid_post) (ShortGPT's BI)")
    logit_lens: LogitLensLayer | None = Field(None, description="with logit_lens=K")
    tuned_lens: LogitLensLayer | None = Field(
        None, description="with tuned_lens=K: the same through the layer's trained translator (docs/tuned_lens.md)"
    )
    grad_norm: Stat = Field(None, description="with gradients=true: |dL/d resid_pre|")
    delta_loss: DeltaLoss | None = Field(None, description="with ablation=true: loss change with the part skipped")


class DiagnosticsTokens(_Strict):
    ids: list[int]
    text: list[str]


class DiagnosticsSummary(_Strict):
    norm_growth_per_layer: Stat
    largest_update_layer: int
    spearman_bi_vs_delta_loss: Stat = Field(None, description="with ablation=true")


class DiagnosticsOptionsEcho(_Strict):
    per_token: bool
    logit_lens: int
    tuned_lens: int
    gradients: bool
    ablation: bool
    intervention: InterventionEcho | None


class DiagnosticsModel(_Strict):
    name: str
    n_layer: int
    d_model: int
    residual: bool
    checkpoint_sha256: str


class DiagnosticsResponse(_Strict):
    """Body of a JSON /diagnostics answer."""

    tokens: DiagnosticsTokens
    n_tokens: int
    loss: Stat = Field(..., description="mean next-token loss over the prompt, nats (None under 2 tokens)")
    options: DiagnosticsOptionsEcho
    layers: list[LayerDiagnostics]
    summary: DiagnosticsSummary
    notes: list[str]
    model: DiagnosticsModel
