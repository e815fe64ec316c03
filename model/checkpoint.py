"""Checkpoints: one safetensors file holding the weights, the model config and provenance metadata.

Loading never unpickles anything. Every problem raises `CheckpointError` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from model import tokenizer
from model.config import ModelConfig
from model.transformer import Transformer, parameter_shapes

log = logging.getLogger(__name__)

FORMAT = "shortcut-lm/1"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # far above any real header; refuses "huge header" files early
MAX_FILE_BYTES = 2 * 1024**3
MAX_METADATA_BYTES = 4 * 1024 * 1024  # the provenance JSON (a resume file's history included) is a few KB
MAX_METADATA_DEPTH = 32  # nesting of the provenance JSON (real files: 3); deeper, answering it (GET /info) fails


class CheckpointError(Exception):
    """A checkpoint file cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model plus where it came from."""

    model: Transformer
    config: ModelConfig
    metadata: dict[str, Any]
    path: Path
    sha256: str
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """Installed version of this package, or 'unknown'."""
    try:
        from importlib.metadata import version

        return version("shortcut-lm")
    except Exception:  # noqa: BLE001 - running from a source tree without install
        return "unknown"


def save_checkpoint(
    model: Transformer,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write weights + config + metadata to `path` atomically; return the file's sha256.

    `extra` holds additional tensors (e.g. optimizer state) stored under the `extra.` prefix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "tokenizer": tokenizer.KIND,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        **(metadata or {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for k, v in (extra or {}).items():
        tensors[f"extra.{k}"] = v.detach().to("cpu").contiguous()
    header = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), "metadata": json.dumps(meta)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return sha256_file(path)


def _read_header(path: Path, data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: not a safetensors file or header too large ({n} bytes declared)")
    if 8 + n > len(data):
        raise CheckpointError(f"{path}: truncated (header declares {n} bytes, file has {len(data)})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a safetensors file (header JSON is nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: not a safetensors file (__metadata__ must map strings to strings)")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise CheckpointError(f"{path}: not a safetensors file (bad entry for tensor {name!r})")
        end = max(end, offsets[1])
    if 8 + n + end > len(data):
        raise CheckpointError(f"{path}: truncated (tensor data needs {8 + n + end} bytes, file has {len(data)})")
    return header


def read_checkpoint_info(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and metadata of a checkpoint without building the model."""
    path = Path(path)
    _, config, meta = _load_raw(path, _read_bytes(path))
    return config, meta


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CheckpointError(f"{path}: file too large ({size} bytes)")
    return path.read_bytes()


def _load_raw(path: Path, data: bytes) -> tuple[dict[str, Any], ModelConfig, dict[str, Any]]:
    header = _read_header(path, data)
    meta_raw = header.get("__metadata__") or {}
    if meta_raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a shortcut-lm checkpoint (format={meta_raw.get('format')!r})")
    try:
        config_raw = json.loads(meta_raw["config"])
        if not isinstance(config_raw, dict):
            raise ValueError("config is not a JSON object")
        config = ModelConfig.from_dict(config_raw)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: bad config in header: {e}") from None
    text = meta_raw.get("metadata", "{}")
    if len(text) > MAX_METADATA_BYTES:
        raise CheckpointError(f"{path}: metadata is {len(text)} characters, more than {MAX_METADATA_BYTES}")
    try:
        metadata = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: bad metadata in header: {e}") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: bad metadata in header: not a JSON object")
    if json_depth(metadata) > MAX_METADATA_DEPTH:
        raise CheckpointError(f"{path}: metadata is nested more than {MAX_METADATA_DEPTH} levels deep")
    return header, config, metadata


def json_depth(value: Any) -> int:
    """How deeply `value` (parsed JSON) nests objects and arrays (a scalar: 0, `{"a": 1}`: 1), without recursion."""
    depth, level = 0, [value]
    while containers := [v for v in level if isinstance(v, dict | list)]:
        depth += 1
        level = [child for v in containers for child in (v.values() if isinstance(v, dict) else v)]
    return depth


def _check_header_shapes(path: Path, header: dict[str, Any], config: ModelConfig) -> None:
    """Compare the tensor names and shapes declared in the header with those the config implies.

    Only the header is read: a config that lies about its size costs no memory. The tensor count comes first: a
    config declaring far more tensors than the file holds (2,000,000 layers in a small file) is refused before the
    names of its tensors are listed; a near miss is refused below, with the names missing or unexpected.
    """
    declared = {k: v.get("shape") for k, v in header.items() if k != "__metadata__" and not k.startswith("extra.")}
    count = tensor_count(config)
    if count > 2 * len(declared) + 64:  # listing the names would cost more than the header did: the count says it
        raise CheckpointError(
            f"{path}: tensors do not match config (n_layer={config.n_layer}): it implies {count} tensors, "
            f"the file holds {len(declared)}"
        )
    expected = parameter_shapes(config)
    missing, unexpected = sorted(set(expected) - set(declared)), sorted(set(declared) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match config (n_layer={config.n_layer}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, ref in expected.items():
        if list(ref) != declared[name]:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(declared[name] or ())}, config implies {ref}"
            )


def tensor_count(config: ModelConfig) -> int:
    """How many tensors `parameter_shapes(config)` lists, without listing them."""
    per_module = 2 if config.bias else 1  # weight, and bias if any
    return 2 + per_module * (6 * config.n_layer + 1)  # wte, wpe; 6 modules a block; ln_f


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; raise CheckpointError on any problem."""
    path = Path(path)
    data = _read_bytes(path)
    header, config, metadata = _load_raw(path, data)
    if metadata.get("tokenizer", tokenizer.KIND) != tokenizer.KIND:
        raise CheckpointError(f"{path}: unsupported tokenizer {metadata.get('tokenizer')!r}")
    if config.vocab_size != tokenizer.VOCAB_SIZE:
        raise CheckpointError(f"{path}: vocab_size {config.vocab_size} does not match the byte tokenizer (256)")
    _check_header_shapes(path, header, config)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: invalid safetensors data: {e}") from None
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    weights = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    for name, got in weights.items():  # names and shapes were checked against the header
        if got.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {got.dtype}")
        if not torch.isfinite(got).all():
            raise CheckpointError(f"{path}: tensor {name} contains NaN or inf")
    model = Transformer(config)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.to(device).eval()
    sha = hashlib.sha256(data).hexdigest()
    log.info("loaded checkpoint %s (sha256 %s, %d params)", path, sha[:12], model.num_params())
    return Checkpoint(model=model, config=config, metadata=metadata, path=path, sha256=sha, extra=extra)
