"""Steering vectors: the contrastive mean difference of the residual stream (a job for `Engine.run_job`), and the
vector file (one safetensors file per vector: the tensor and string metadata; loading never unpickles and checks
everything, raising `SteeringFileError` naming the file)."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from model.transformer import Transformer

FORMAT = "shortcut-steering/1"
SUFFIX = ".safetensors"
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
NAME_RE = re.compile(NAME_PATTERN)
MODEL_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_D_MODEL = 65536
MAX_FILE_BYTES = 8 + 64 * 1024 + 4 * MAX_D_MODEL  # a header far larger than ours, and the largest vector
REDUCES = ("mean", "last")
Reduce = Literal["mean", "last"]
SOURCES = ("contrast", "upload")

ContrastResult = tuple[torch.Tensor, tuple[int, int]]


class SteeringFileError(Exception):
    """A vector file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class SteeringVector:
    """One named vector and where it came from. `vector` is float32, on the CPU, shape (d_model,)."""

    name: str
    model: str
    checkpoint_sha256: str
    layer: int
    vector: torch.Tensor
    positive: int  # prompts in each set it was computed from (0 for an uploaded vector)
    negative: int
    reduce: str  # "mean" | "last" | "" (uploaded)
    source: str  # "contrast" | "upload"
    created: int  # unix seconds

    @property
    def norm(self) -> float:
        """The vector's L2 norm."""
        return float(self.vector.norm())

    def metadata(self) -> dict[str, str]:
        """The file's string metadata."""
        return {
            "format": FORMAT,
            "name": self.name,
            "model": self.model,
            "checkpoint_sha256": self.checkpoint_sha256,
            "layer": str(self.layer),
            "positive": str(self.positive),
            "negative": str(self.negative),
            "reduce": self.reduce,
            "source": self.source,
            "created": str(self.created),
        }


# --- the contrastive mean difference ----------------------------------------------------------------------------


def contrast(
    model: Transformer, positive: list[list[int]], negative: list[list[int]], layer: int, reduce: Reduce = "mean"
) -> Generator[None, None, ContrastResult]:
    """mean(positive) - mean(negative) of `resid_post[layer]`, each prompt reduced over its positions (`mean`) or
    taken at its last position (`last`). A generator for `Engine.run_job`: one forward per prompt, a yield after each.
    Returns (vector (d_model,) float32 on the CPU, (prompts in positive, prompts in negative))."""
    n_layer, window = model.config.n_layer, model.config.block_size
    if not 0 <= layer < n_layer:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{n_layer - 1}")
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {', '.join(REDUCES)}")
    for set_name, prompts in (("positive", positive), ("negative", negative)):
        if not prompts:
            raise ValueError(f"{set_name} needs at least one prompt")
        for i, ids in enumerate(prompts):
            if not 1 <= len(ids) <= window:
                raise ValueError(f"{set_name}[{i}] is {len(ids)} tokens; it needs 1..{window}")
    device = next(model.parameters()).device
    sums = []
    for prompts in (positive, negative):
        total = torch.zeros(model.config.d_model, dtype=torch.float64)
        for ids in prompts:
            with torch.no_grad():
                out = model(torch.tensor([ids], device=device), return_resid=True)
                assert out.resid is not None
                r = out.resid[layer]["resid_post"][0].float()  # (T, C)
                total += (r.mean(dim=0) if reduce == "mean" else r[-1]).double().cpu()
            yield
        sums.append(total / len(prompts))
    return (sums[0] - sums[1]).float(), (len(positive), len(negative))


def contrast_job(
    positive: list[list[int]], negative: list[list[int]], layer: int, reduce: Reduce = "mean"
) -> Callable[[Transformer], Generator[None, None, ContrastResult]]:
    """`contrast` as a job for `Engine.run_job` (which calls it with the engine's model)."""
    return functools.partial(contrast, positive=positive, negative=negative, layer=layer, reduce=reduce)


# --- the file ---------------------------------------------------------------------------------------------------


def save_vector(path: str | Path, vec: SteeringVector, *, exclusive: bool = False) -> None:
    """Write `vec` to `path` atomically: a temporary file in the same folder, flushed, then renamed over `path` (so
    a reader, in this process or another replica on a shared volume, sees the old file or the new one, never half).

    With `exclusive`, the file must not exist yet: `FileExistsError` otherwise, decided atomically by the file system
    (a hard link), so two replicas creating one name cannot both win."""
    path = Path(path)
    check_vector(vec)
    data = save({"vector": vec.vector.detach().to("cpu", torch.float32).contiguous()}, metadata=vec.metadata())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename (not atomic across replicas)
                if path.exists():
                    raise FileExistsError(str(path)) from None
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_vector(vec: SteeringVector) -> None:
    """Raise ValueError when `vec` could not be written and read back (bad name, metadata, shape or values)."""
    problem = _problem(
        vec.metadata(), tuple(vec.vector.shape), str(vec.vector.dtype).removeprefix("torch."), vec.vector
    )
    if problem:
        raise ValueError(problem)


def load_vector(path: str | Path) -> SteeringVector:
    """Read and check one vector file; any problem raises `SteeringFileError` naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SteeringFileError(f"{path}: file too large ({size} bytes; a vector file is at most {MAX_FILE_BYTES})")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SteeringFileError(f"{path}: cannot read: {e.strerror or e}") from None
    meta, shape, dtype = _read_header(path, data)
    problem = _problem(meta, shape, dtype, None)
    if problem:
        raise SteeringFileError(f"{path}: {problem}")
    try:
        vector = load(data)["vector"]
    except (SafetensorError, ValueError, RuntimeError, KeyError) as e:
        raise SteeringFileError(f"{path}: invalid safetensors data: {e}") from None
    problem = _problem(meta, tuple(vector.shape), str(vector.dtype).removeprefix("torch."), vector)
    if problem:
        raise SteeringFileError(f"{path}: {problem}")
    if meta["name"] + SUFFIX != path.name:
        raise SteeringFileError(f"{path}: holds the vector named {meta['name']!r}; the file must be named after it")
    return SteeringVector(
        name=meta["name"],
        model=meta["model"],
        checkpoint_sha256=meta["checkpoint_sha256"],
        layer=int(meta["layer"]),
        vector=vector.contiguous(),
        positive=int(meta["positive"]),
        negative=int(meta["negative"]),
        reduce=meta["reduce"],
        source=meta["source"],
        created=int(meta["created"]),
    )


def _read_header(path: Path, data: bytes) -> tuple[dict[str, str], tuple[int, ...], str]:
    """(string metadata, the vector's declared shape, its declared dtype), from the safetensors header alone."""
    if len(data) < 8:
        raise SteeringFileError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise SteeringFileError(f"{path}: truncated or not a safetensors file (header declares {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SteeringFileError(f"{path}: not a safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise SteeringFileError(f"{path}: not a safetensors file (the header is not a JSON object)")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SteeringFileError(f"{path}: metadata missing or not a map of strings to strings")
    if meta.get("format") != FORMAT:
        raise SteeringFileError(f"{path}: not a steering vector file (format {str(meta.get('format'))[:40]!r})")
    if set(header) != {"vector"} or not isinstance(header["vector"], dict):
        raise SteeringFileError(f"{path}: a vector file holds one tensor called 'vector'")
    shape, dtype = header["vector"].get("shape"), header["vector"].get("dtype")
    if not (isinstance(shape, list) and all(type(s) is int for s in shape)) or not isinstance(dtype, str):
        raise SteeringFileError(f"{path}: bad shape or dtype for the tensor 'vector'")
    dtypes = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    return meta, tuple(shape), dtypes.get(dtype, dtype)


def _int(text: str, lo: int, hi: int) -> int | None:
    """`text` as a plain decimal integer within lo..hi, else None."""
    if not re.fullmatch(r"-?[0-9]{1,19}", text):
        return None
    value = int(text)
    return value if lo <= value <= hi else None


def _problem(meta: dict[str, str], shape: tuple[int, ...], dtype: str, vector: torch.Tensor | None) -> str | None:
    """What is wrong with a vector's metadata, shape, dtype and (when given) values; None when nothing is."""
    expected = {"format", "name", "model", "checkpoint_sha256", "layer", "positive", "negative", "reduce", "source"}
    missing = sorted((expected | {"created"}) - set(meta))
    if missing:
        return f"metadata lacks {', '.join(missing)}"
    if meta["format"] != FORMAT:
        return f"format must be {FORMAT!r}"
    if not NAME_RE.fullmatch(meta["name"]):
        return "metadata name must match " + NAME_PATTERN
    if not MODEL_RE.fullmatch(meta["model"]):
        return "metadata model is not a model name"
    if not SHA256_RE.fullmatch(meta["checkpoint_sha256"]):
        return "metadata checkpoint_sha256 is not 64 lowercase hex digits"
    if _int(meta["layer"], 0, 4095) is None:
        return "metadata layer is not an integer in 0..4095"
    for key in ("positive", "negative"):
        if _int(meta[key], 0, 1_000_000) is None:
            return f"metadata {key} is not a count"
    if _int(meta["created"], 0, 2**62) is None:
        return "metadata created is not unix seconds"
    if meta["source"] not in SOURCES:
        return f"metadata source must be one of {', '.join(SOURCES)}"
    if meta["reduce"] not in (REDUCES if meta["source"] == "contrast" else ("",)):
        return "metadata reduce does not fit its source"
    if len(shape) != 1 or not 1 <= shape[0] <= MAX_D_MODEL:
        return f"the vector must have shape (d_model,) with d_model in 1..{MAX_D_MODEL}, not {shape}"
    if dtype != "float32":
        return f"the vector must be float32, not {dtype}"
    if vector is not None:
        if vector.dtype != torch.float32 or not bool(torch.isfinite(vector).all()):
            return "the vector contains NaN or inf"
        if not math.isfinite(float(vector.norm())):
            return "the vector's norm overflows float32"
    return None
