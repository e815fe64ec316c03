"""Loading the served models and driving their engines (no HTTP here either: routes adapt it)."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from app.metrics import Metrics
from app.settings import Settings
from model import tokenizer
from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.diagnostics import DiagnosticsOptions, run_diagnostics
from model.engine import Engine
from model.lens import TunedLens, find_lens, is_lens_file, no_lens_message

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One checkpoint being served, with its engine."""

    name: str
    checkpoint: Checkpoint
    engine: Engine
    created: int
    lens: TunedLens | None = None  # the tuned lens beside the checkpoint (model.lens), if it has one

    @property
    def sha256(self) -> str:
        """The checkpoint file's sha256."""
        return self.checkpoint.sha256


def select_device(setting: str) -> torch.device:
    """Resolve SHORTCUT_DEVICE (auto|cpu|cuda) to a torch device."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SHORTCUT_DEVICE=cuda but CUDA is not available")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def configure_threads(threads: int) -> int:
    """Set torch intra-op threads (0 = all available cores but one) and return the number used.

    A decode step of this model is many small ops: extra intra-op threads only spin, while the HTTP
    event loop needs a core of its own (docs/performance.md: 1 vs 2 threads on 2 cores).
    """
    n = threads or max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(n)
    return n


def release_free_memory() -> bool:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`); False where there is no such call.

    Loading a checkpoint and the first forward passes free tens of MB that glibc keeps in the heap
    (its mmap threshold grows with each large free), so the idle server would hold them for good.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's, if that is its C library
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # as SHORTCUT_MODEL_NAME: what a name in URLs, JSON and logs holds


def checkpoint_paths(settings: Settings) -> dict[str, Path]:
    """Name -> checkpoint path of every model to serve; the main model first. A file in the extra folder whose stem
    is not a model name (letters, digits, `._-`, 1..64 characters) is skipped with a warning naming it."""
    paths = {settings.model_name: settings.checkpoint}
    if settings.extra_checkpoints_dir is not None:
        for p in sorted(Path(settings.extra_checkpoints_dir).glob("*.safetensors")):
            if p.resolve() == settings.checkpoint.resolve() or is_lens_file(p):  # a lens (model.lens): no model
                continue
            if not p.name.endswith(".resume.safetensors"):
                if not MODEL_NAME.fullmatch(p.stem):
                    log.warning(
                        "skipping %s: its name %s is not a model name (letters, digits, . _ -; 1..64 characters)",
                        ascii(str(p)),
                        ascii(p.stem),
                    )
                    continue
                paths.setdefault(p.stem, p)
    return paths


def load_models(settings: Settings, metrics: Metrics, device: torch.device) -> dict[str, ServedModel]:
    """Load every checkpoint (and its tuned lens, if it has one) and make an engine for each. Any problem raises
    CheckpointError naming the file: the file's own (model.checkpoint), or the engine's refusal of it (a lens that
    is not the checkpoint's, a window under the warm-up's, a shape the fused step does not run, a KV cache that
    cannot be mapped, a setting that does not fit it)."""
    models: dict[str, ServedModel] = {}
    for name, path in checkpoint_paths(settings).items():
        try:
            models[name] = _serve(name, path, settings, metrics, device)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a file (or a setting with it) does, the error names the file
            raise CheckpointError(f"{path}: cannot serve it: {str(e) or type(e).__name__}") from e
    return models


def _serve(name: str, path: Path, settings: Settings, metrics: Metrics, device: torch.device) -> ServedModel:
    """Load one checkpoint and make its engine."""
    ck = load_checkpoint(path, device=device)
    lens = find_lens(path, ck.config, ck.sha256, device)  # LensError if it is not this checkpoint's
    engine = Engine(
        ck.model,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        prefill_tokens=settings.max_prefill_tokens,
        prefill_chunk=settings.prefill_chunk,
        decode_weights=settings.decode_weights,
        decode_backend=settings.decode_backend,
        kv_cache_dtype=settings.kv_cache_dtype,
        decode_threads=settings.decode_threads,
        request_timeout_s=settings.request_timeout_s,
        observer=metrics.observer(name),
        job_share=settings.diagnostics_share,
        max_stop_strings=settings.max_stop_strings,
        max_stop_length=settings.max_stop_length,
        max_logprobs=settings.max_logprobs,
        max_pending_events=settings.max_pending_events,
        lens=lens,
        no_tuned_lens=no_lens_message(name, path),
    )
    c = ck.config
    metrics.model_info.labels(name, ck.sha256, str(c.n_layer), str(c.d_model), device.type).set(1)
    return ServedModel(name=name, checkpoint=ck, engine=engine, created=int(time.time()), lens=lens)


def check_aliases(aliases: dict[str, str], models: dict[str, ServedModel]) -> None:
    """Every SHORTCUT_MODEL_ALIASES target must be served, and no alias may hide a served model's own name."""
    for alias, target in aliases.items():
        if target not in models:
            raise ValueError(f"SHORTCUT_MODEL_ALIASES: {alias}={target}, but no model {target!r} is served")
        if alias in models:
            raise ValueError(f"SHORTCUT_MODEL_ALIASES: {alias!r} is already a served model's name")


def resolve(models: dict[str, ServedModel], aliases: dict[str, str], name: str) -> ServedModel | None:
    """The served model called `name`, or the one its alias names, answering under the alias (as vLLM answers
    under the served model name the client sent); None if neither."""
    served = models.get(name)
    if served is None and name in aliases:
        target = models.get(aliases[name])
        served = dataclasses.replace(target, name=name) if target is not None else None
    return served


def warm_up(served: ServedModel) -> float:
    """Warm the engine's forward and decode paths up before serving; return seconds."""
    t0 = time.perf_counter()
    served.engine.warm_up()
    # the process's first backward pass pays a one-off setup (~1 s here); a /diagnostics job must not, as it would
    # stall running streams for that long
    model, cfg = served.checkpoint.model, served.checkpoint.config
    run_diagnostics(model, tokenizer.encode("Warm up.")[: cfg.block_size], DiagnosticsOptions(gradients=True))
    return time.perf_counter() - t0
