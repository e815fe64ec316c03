"""The tuned lens (Belrose et al. 2023): one affine translator per layer, read before `ln_f` and the unembedding.

A layer's residual stream h (resid_post) reads as the model's next-token distribution through
`softmax(unembed(ln_f(h + A h + b)))`, with one (A, b) per layer but the last (whose stream *is* the final one: its
translator is the identity). This is the `tuned-lens` library's form (the translator's output added to h, A and b
initialised at 0, so an untrained lens is the logit lens). `python -m training.tuned_lens` trains them.

The translators live in a file beside the checkpoint, `<name>.lens.safetensors` (`lens_path`), whose metadata
carries the sha256 of the checkpoint they were trained on: a lens is refused for any other checkpoint, and the
checkpoint file (and its sha256, which steering vectors and responses name) stays as it was. Safetensors only.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from model.checkpoint import CheckpointError
from model.config import ModelConfig

log = logging.getLogger(__name__)

FORMAT = "shortcut-lens/1"
SUFFIX = ".lens.safetensors"
MAX_FILE_BYTES = 512 * 1024**2
TRAIN_HINT = "python -m training.tuned_lens --checkpoint {checkpoint} --data TEXT"


class LensError(CheckpointError):
    """A lens file cannot be used with this checkpoint; the message names the file, the problem and the fix."""


def lens_path(checkpoint: str | Path) -> Path:
    """Where the tuned lens of `checkpoint` lives: `x.safetensors` -> `x.lens.safetensors`, beside it."""
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".safetensors") + SUFFIX)


def is_lens_file(path: str | Path) -> bool:
    """Whether `path` names a lens file (not a checkpoint)."""
    return Path(path).name.endswith(SUFFIX)


def no_lens_message(name: str, checkpoint: str | Path | None = None) -> str:
    """The answer to a request for the tuned lens of a model that has none: what to run to get one."""
    where = checkpoint if checkpoint is not None else "CHECKPOINT"
    return (
        f"model {name!r} has no tuned lens: train its translators with "
        f"`{TRAIN_HINT.format(checkpoint=where)}` (writes {lens_path(where).name} beside the checkpoint), then "
        "restart the server; or use the logit lens"
    )


@dataclass(frozen=True)
class TunedLens:
    """Translators of layers 0..n_layer-2: `weight` (n_layer - 1, C, C) = A, `bias` (n_layer - 1, C) = b."""

    weight: torch.Tensor
    bias: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layer(self) -> int:
        """Layers of the model this lens reads (one more than it has translators)."""
        return self.weight.shape[0] + 1

    def apply(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s stream h (..., C) translated: h + A h + b (the last layer: h itself)."""
        if not 0 <= layer < self.n_layer:
            raise ValueError(f"layer {layer} is not in 0..{self.n_layer - 1}")
        if layer == self.n_layer - 1:
            return h
        return h + F.linear(h, self.weight[layer], self.bias[layer])

    def apply_all(self, stream: torch.Tensor) -> torch.Tensor:
        """Every layer's stream (n_layer, ..., C) translated at once (the same as `apply` layer by layer)."""
        if stream.shape[0] != self.n_layer:
            raise ValueError(f"stream has {stream.shape[0]} layers, the lens reads {self.n_layer}")
        head = stream[:-1]  # (L - 1, ..., C)
        flat = head.reshape(head.shape[0], -1, head.shape[-1])  # (L - 1, N, C)
        moved = torch.baddbmm(self.bias[:, None, :], flat, self.weight.transpose(1, 2))  # (L - 1, N, C): A h + b
        return torch.cat([head + moved.view_as(head), stream[-1:]])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TunedLens:
        """The lens on `device` (and `dtype`)."""
        return TunedLens(self.weight.to(device, dtype), self.bias.to(device, dtype), self.metadata)


def save_lens(
    path: str | Path,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    checkpoint_sha256: str,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write translators (n_layer - 1, C, C) and (n_layer - 1, C) to `path` atomically, tied to a checkpoint."""
    path = Path(path)
    if weight.dim() != 3 or weight.shape[1] != weight.shape[2] or bias.shape != weight.shape[:2]:
        raise ValueError(f"translators need shapes (L-1, C, C) and (L-1, C), got {tuple(weight.shape)}, {bias.shape}")
    header = {
        "format": FORMAT,
        "checkpoint_sha256": checkpoint_sha256,
        "metadata": json.dumps(metadata or {}),
    }
    tensors = {"weight": weight.detach().float().cpu().contiguous(), "bias": bias.detach().float().cpu().contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)


def load_lens(
    path: str | Path, config: ModelConfig, checkpoint_sha256: str, device: torch.device | str = "cpu"
) -> TunedLens:
    """Load and check a lens for the checkpoint of `config` and `checkpoint_sha256`; LensError on any problem."""
    path = Path(path)
    retrain = f"retrain it ({TRAIN_HINT.format(checkpoint='CHECKPOINT')}) or remove {path.name}"
    if not path.is_file():
        raise LensError(f"{path}: lens file not found")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise LensError(f"{path}: lens file too large ({size} bytes)")
    data = path.read_bytes()
    try:
        tensors = load(data)
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}  # load() checked the header
    except (SafetensorError, ValueError, RuntimeError, struct.error, RecursionError, AttributeError) as e:
        raise LensError(f"{path}: not a safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise LensError(f"{path}: not a tuned-lens file (format={meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("checkpoint_sha256") != checkpoint_sha256:
        raise LensError(
            f"{path}: trained for checkpoint sha256 {str(meta.get('checkpoint_sha256'))[:12]}…, but the checkpoint "
            f"beside it is {checkpoint_sha256[:12]}…; {retrain}"
        )
    L, C = config.n_layer, config.d_model
    want = {"weight": (L - 1, C, C), "bias": (L - 1, C)}
    if set(tensors) != set(want):
        raise LensError(f"{path}: expected tensors {sorted(want)}, found {sorted(tensors)}; {retrain}")
    for name, shape in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise LensError(f"{path}: {name} has shape {tuple(t.shape)}, the model needs {shape}; {retrain}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LensError(f"{path}: {name} has unsupported dtype {t.dtype}")
        if not torch.isfinite(t).all():
            raise LensError(f"{path}: {name} contains NaN or inf; {retrain}")
    try:
        metadata = json.loads(meta.get("metadata", "{}"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise LensError(f"{path}: bad metadata: {e}") from None
    if not isinstance(metadata, dict):
        raise LensError(f"{path}: metadata is not a JSON object")
    lens = TunedLens(tensors["weight"].float(), tensors["bias"].float(), metadata).to(device)
    log.info("loaded tuned lens %s (%d translators)", path, L - 1)
    return lens


def find_lens(
    checkpoint: str | Path, config: ModelConfig, checkpoint_sha256: str, device: torch.device | str = "cpu"
) -> TunedLens | None:
    """The lens beside `checkpoint` if there is one (checked: LensError if it does not fit), else None."""
    path = lens_path(checkpoint)
    return load_lens(path, config, checkpoint_sha256, device) if path.exists() else None
