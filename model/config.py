"""Model configuration: a frozen dataclass saved inside every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MAX_DIM = 2**24  # above any real width, depth or window; refuses absurd sizes before any arithmetic on them


def _short(value: object) -> str:
    """`value`'s repr, cut to 40 characters (it may come from a crafted file)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the pre-LayerNorm residual Transformer."""

    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 16
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    dropout: float = 0.0  # on embeddings, each block's output F(x) and inside the MLP
    attn_dropout: float = 0.0  # on attention probabilities; > 0 leaves SDPA's fused CPU kernel
    bias: bool = True
    residual: bool = True

    def __post_init__(self) -> None:
        # every field's type is checked, not assumed: a config comes from a checkpoint file's JSON
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= MAX_DIM:
                raise ValueError(f"ModelConfig.{name} must be an integer in 1..{MAX_DIM}, got {_short(value)}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be a number in [0, 1), got {_short(value)}")
        for name in ("bias", "residual"):
            value = getattr(self, name)
            if type(value) is not bool:
                raise ValueError(f"ModelConfig.{name} must be true or false, got {_short(value)}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, rejecting unknown keys; missing keys take defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)
