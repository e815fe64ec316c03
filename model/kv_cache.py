"""The KV cache: preallocated keys and values of every layer for a fixed number of sequence rows.

Caller-owned state: the engine owns one for its batch, a forward or a decode step writes into the rows it is given.
"""

from __future__ import annotations

import math
import mmap

import torch

from model.config import ModelConfig


class KVCache:
    """Preallocated keys/values for `n_rows` sequences: (n_layer, rows, n_head, block_size, head_dim)."""

    def __init__(
        self,
        config: ModelConfig,
        n_rows: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (config.n_layer, n_rows, config.n_head, config.block_size, config.head_dim)
        self.k = _zeros(shape, device, dtype)
        self.v = _zeros(shape, device, dtype)

    @property
    def n_rows(self) -> int:
        """Number of sequence rows."""
        return self.k.shape[1]

    @staticmethod
    def over(k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache over existing key and value tensors (views of another cache's)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = k, v
        return view

    def rows(self, start: int, stop: int) -> KVCache:
        """A view over rows [start, stop): writes through it land in this cache."""
        return KVCache.over(self.k[:, start:stop], self.v[:, start:stop])

    def copy_row(self, src: int, dst: int) -> None:
        """Copy one row's keys/values over another (used to keep live rows contiguous)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])


def _zeros(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Zeros; on CPU in an anonymous memory map, whose 4 KB pages cost resident memory only once written.

    A cache sized for max_batch_size x block_size is then paid for as sequences fill it, not at start.
    (numpy's calloc'd `np.zeros` asks for transparent huge pages on large arrays, so writing one row's first
    position made a whole 2 MB region resident: 60-120 MB of cache after the 4-row warm-up.)
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    n_bytes = max(1, math.prod(shape) * dtype.itemsize)
    flat = torch.frombuffer(mmap.mmap(-1, n_bytes), dtype=torch.uint8)  # keeps the map alive
    return flat[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
