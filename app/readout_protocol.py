"""Bodies of the routes that read the residual stream out (POST /hidden_states, POST /patching, /generate's
`return_hidden_states`), their checks against a served model, and the arrays' encodings.

The array layout, exactly: `data` holds the float32 or float16 values of a C-order (row-major) array, little-endian.
POST /hidden_states: per prompt an array (layers, sites, positions of that prompt, d_model), the prompts' arrays one
after another (when every prompt has the same number of positions, as with `"last"`, that is the C-order array of
`shape` = [prompts, layers, sites, positions, d_model]; otherwise `shape`'s positions entry is null and
`positions[i]` gives each prompt's count). /generate: per token an array (layers, sites, d_model). With
`encoding: "list"` the same numbers nest as JSON lists in the same order.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from app.errors import APIError
from app.schemas import InterventionSpec, JsonNumber, ModelName, Utf8Only
from model import tokenizer
from model.readout import PATCH_SITES
from model.transformer import RESID_NAMES

Site = Literal["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
PatchSite = Literal["resid_pre", "attn_out", "mlp_out", "resid_post"]
StreamSite = Literal["resid_pre", "resid_post"]  # what the decode steps return: the stream between blocks
Encoding = Literal["list", "base64"]
DType = Literal["float32", "float16"]
MAX_SCHEMA_LIST = 4096  # schema caps; the settings' byte and grid caps are what bind
LayerIndex = Annotated[int, Field(ge=0, le=MAX_SCHEMA_LIST), JsonNumber]
Position = Annotated[int, Field(ge=-65536, le=65535), JsonNumber]
Prompt = Annotated[str, Field(min_length=1), Utf8Only]
ITEMSIZE = {"float32": 4, "float16": 2}
SAFETENSORS = "application/vnd.safetensors"
GENERATE_SITES: tuple[str, ...] = ("resid_pre", "resid_post")
assert set(PATCH_SITES) <= set(RESID_NAMES)


def _unique(values: list[Any], field: str) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{field} repeats an entry")


class HiddenStatesRequest(BaseModel):
    """Body of POST /hidden_states: the residual stream's vectors at `sites` of `layers` and `positions`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["prompts"]}]}
    )

    model: ModelName | None = Field(None, description="a served model; default the main one")
    prompt: Prompt | SkipJsonSchema[None] = Field(None, description="one text (or `prompts`)")
    prompts: Annotated[list[Prompt], Field(min_length=1, max_length=1024)] | SkipJsonSchema[None] = Field(
        None, description="several texts, at most SHORTCUT_MAX_PROMPTS"
    )
    layers: (
        Literal["all"]
        | Annotated[
            list[LayerIndex], Field(min_length=1, max_length=MAX_SCHEMA_LIST, json_schema_extra={"uniqueItems": True})
        ]
    ) = Field("all", description="block indices, or all")
    sites: Annotated[list[Site], Field(min_length=1, max_length=5, json_schema_extra={"uniqueItems": True})] = Field(
        ["resid_post"], description="TransformerLens names: resid_pre, attn_out, resid_mid, mlp_out, resid_post"
    )
    positions: (
        Literal["all", "last"]
        | Annotated[
            list[Position], Field(min_length=1, max_length=MAX_SCHEMA_LIST, json_schema_extra={"uniqueItems": True})
        ]
    ) = Field("all", description="all, last, or indices (negative count from the end) applied to every prompt")
    encoding: Encoding = Field("list", description="list: nested JSON lists; base64: one little-endian C-order array")
    dtype: DType = "float32"
    format: Literal["json", "safetensors"] | SkipJsonSchema[None] = Field(
        None, description="safetensors (or Accept: application/vnd.safetensors): a safetensors file instead of JSON"
    )
    intervention: InterventionSpec | None = Field(
        None, description="as on /generate: skip or scale blocks' F(x), add steering vectors"
    )

    @model_validator(mode="after")
    def _check(self) -> HiddenStatesRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of prompt or prompts")
        _unique(self.sites, "sites")
        if isinstance(self.layers, list):
            _unique(self.layers, "layers")
        return self

    def texts(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class ReturnHiddenStates(BaseModel):
    """/generate's `return_hidden_states`: with each token, the stream at the position that produced it."""

    model_config = ConfigDict(extra="forbid")

    layers: (
        Literal["all"]
        | Annotated[
            list[LayerIndex], Field(min_length=1, max_length=MAX_SCHEMA_LIST, json_schema_extra={"uniqueItems": True})
        ]
    ) = "all"
    sites: Annotated[list[Site], Field(min_length=1, max_length=5, json_schema_extra={"uniqueItems": True})] = Field(
        ["resid_post"],
        description="resid_pre or resid_post (the stream between blocks, what the decode step returns); the "
        "inside of a block (attn_out, resid_mid, mlp_out) is POST /hidden_states's",
    )
    encoding: Encoding = "list"
    dtype: DType = "float32"

    @model_validator(mode="after")
    def _check(self) -> ReturnHiddenStates:
        _unique(self.sites, "sites")
        if isinstance(self.layers, list):
            _unique(self.layers, "layers")
        return self


class PatchingRequest(BaseModel):
    """Body of POST /patching: activation patching from `clean` into `corrupt`."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName | None = Field(None, description="a served model; default the main one")
    clean: Prompt = Field(..., description="the prompt whose activations are patched in")
    corrupt: Prompt = Field(..., description="the prompt run with one activation patched; as many tokens as clean")
    target: Annotated[str, Field(min_length=1, max_length=8)] | None = Field(
        None, description="the next token measured (one byte); null: the clean run's greedy next token"
    )
    metric: Literal["logprob", "logit_diff"] = Field("logprob", description="logit_diff: target's logit - contrast's")
    contrast: Annotated[str, Field(min_length=1, max_length=8)] | None = Field(
        None, description="the token logit_diff subtracts (one byte)"
    )
    sites: Annotated[list[PatchSite], Field(min_length=1, max_length=4, json_schema_extra={"uniqueItems": True})] = (
        Field(["resid_pre"], description="resid_pre, attn_out, mlp_out, resid_post")
    )
    intervention: InterventionSpec | None = Field(
        None, description="as on /generate, applied to the clean, corrupt and every patched run"
    )

    @model_validator(mode="after")
    def _check(self) -> PatchingRequest:
        _unique(self.sites, "sites")
        return self


class TokensInfo(BaseModel):
    ids: list[int]
    text: list[str]


class HiddenStatesResponse(BaseModel):
    """POST /hidden_states's JSON answer (the layout of `data`: this module's docstring, README)."""

    model: str
    checkpoint_sha256: str
    d_model: int
    tokens: list[TokensInfo]
    layers: list[int]
    sites: list[str]
    positions: list[list[int]]
    shape: list[int | None] = Field(..., description="[prompts, layers, sites, positions (null if ragged), d_model]")
    dtype: str
    encoding: str
    data: Any = Field(..., description="nested lists, or base64 of the little-endian C-order array")
    intervention: dict[str, Any] | None = None


class PatchingResponse(BaseModel):
    """POST /patching's answer: per site, [layer][position] of the normalized effect and the raw metric."""

    model: str
    checkpoint_sha256: str
    metric: str
    target: TokensInfo
    contrast: TokensInfo | None
    clean_metric: float
    corrupt_metric: float
    tokens: dict[str, TokensInfo]
    sites: dict[str, list[list[float]]] | None = Field(
        ..., description="(patched - corrupt) / (clean - corrupt); null when clean and corrupt measure the same"
    )
    raw: dict[str, list[list[float]]]
    normalized: bool
    forwards: int
    intervention: dict[str, Any] | None = None


def tokens_info(ids: list[int]) -> dict[str, Any]:
    return {"ids": list(ids), "text": [tokenizer.token_text(i) for i in ids]}


def one_token(text: str, field: str) -> int:
    """The one token (byte) of `text`; 400 naming `field` when it is more."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise APIError(
            400,
            f"{field} is {len(ids)} tokens ({text!r} is {len(ids)} UTF-8 bytes); it must be one token (one byte)",
            param=field,
            code="invalid_value",
        )
    return ids[0]


def check_layers(layers: Literal["all"] | list[int], n_layer: int, field: str) -> list[int]:
    """The layer indices asked for; 400 naming the entry out of range."""
    if layers == "all":
        return list(range(n_layer))
    for i, layer in enumerate(layers):
        if layer >= n_layer:
            raise APIError(
                400,
                f"{field}[{i}] is {layer}; the model has layers 0..{n_layer - 1}",
                param=f"{field}[{i}]",
                code="invalid_value",
            )
    return list(layers)


def check_bytes(n_bytes: int, limit: int, what: str) -> None:
    """413 when an answer's array would pass SHORTCUT_HIDDEN_STATES_MAX_BYTES, naming it and the size asked for."""
    if n_bytes > limit:
        raise APIError(
            413,
            f"{what} would be {n_bytes} bytes of hidden states; the most is {limit} "
            "(SHORTCUT_HIDDEN_STATES_MAX_BYTES): ask for fewer prompts, layers, sites or positions, or float16",
            param="return_hidden_states" if what == "this generation" else None,
            code="hidden_states_too_large",
        )


def to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """The array as little-endian float32 or float16 (rounded once, from float32)."""
    return t.detach().float().cpu().numpy().astype("<f4" if dtype == "float32" else "<f2")


def encode(arrays: list[torch.Tensor], encoding: str, dtype: str) -> Any:
    """`data`: a list of each array's nested lists, or one base64 string of the arrays' little-endian C-order bytes,
    one after another."""
    nps = [to_numpy(a, dtype) for a in arrays]
    if encoding == "base64":
        return base64.b64encode(b"".join(a.tobytes(order="C") for a in nps)).decode("ascii")
    return [a.tolist() for a in nps]


B64_CHUNK = 3 * 2**18  # bytes per base64 piece (a multiple of 3: the pieces join into the one string)


def base64_pieces(arrays: list[torch.Tensor], dtype: str) -> list[bytes]:
    """`encode(arrays, "base64", dtype)` as ASCII pieces, the GIL handed on between them (a 768 KiB piece holds it
    ~1 ms): a big export encoded on a worker thread then never holds up the engine's thread or the event loop for
    long."""
    raw = b"".join(to_numpy(a, dtype).tobytes(order="C") for a in arrays)
    pieces = []
    for i in range(0, len(raw), B64_CHUNK):
        pieces.append(base64.b64encode(raw[i : i + B64_CHUNK]))
        time.sleep(0)
    return pieces


def encode_one(array: torch.Tensor, encoding: str, dtype: str) -> Any:
    """One array's nested lists, or the base64 of its little-endian C-order bytes."""
    if encoding == "base64":
        return encode([array], encoding, dtype)
    return to_numpy(array, dtype).tolist()


class GeneratedHiddenStates(BaseModel):
    """/generate's answer with `return_hidden_states`: per generated token, the stream at the position that produced
    it (the prompt's last position for the first token), from the same forward that chose the token."""

    layers: list[int]
    sites: list[str]
    shape: list[int] = Field(..., description="[tokens, layers, sites, d_model]")
    dtype: str
    encoding: str
    data: Any = Field(..., description="per token nested lists, or base64 of the little-endian C-order array")


def stream_points(spec: ReturnHiddenStates, n_layer: int) -> tuple[list[int], tuple[int, ...]]:
    """(layers, the points of the stream the engine returns, layer-major): resid_pre of layer l is the stream before
    block l (point l), resid_post after it (point l + 1). 400 naming the field for a layer out of range or a site
    inside a block, which the decode step does not return."""
    for i, site in enumerate(spec.sites):
        if site not in GENERATE_SITES:
            raise APIError(
                400,
                f"return_hidden_states.sites[{i}] is {site!r}; generation returns the stream between blocks "
                "(resid_pre, resid_post): for the inside of a block use POST /hidden_states on the prompt and the "
                "generated text",
                param=f"return_hidden_states.sites[{i}]",
                code="invalid_value",
            )
    layers = check_layers(spec.layers, n_layer, "return_hidden_states.layers")
    return layers, tuple(layer + (site == "resid_post") for layer in layers for site in spec.sites)


def generated_hidden_states(spec: ReturnHiddenStates, layers: list[int], vectors: list[torch.Tensor]) -> dict[str, Any]:
    """The final answer's `hidden_states` from each token's (layers x sites, d_model) vectors."""
    arrays = [v.view(len(layers), len(spec.sites), -1) for v in vectors]
    d_model = arrays[0].shape[-1] if arrays else 0
    return {
        "layers": layers,
        "sites": list(spec.sites),
        "shape": [len(arrays), len(layers), len(spec.sites), d_model],
        "dtype": spec.dtype,
        "encoding": spec.encoding,
        "data": encode(arrays, spec.encoding, spec.dtype),
    }
