"""The named steering vectors of /steering/vectors: in memory, and in `SHORTCUT_STEERING_DIR` when it is set.

With a folder, each vector is one file, `<name>.safetensors` (`model.steering`), written atomically. The folder is the
truth: several replicas sharing it (a shared volume) see each other's writes and deletes because a lookup checks the
one file its name maps to (gone: the vector is gone; changed: it is read again), and a listing re-reads the folder.
The lock serialises the event loop's threads and the engine's worker, which may both call in."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from app.errors import APIError
from app.metrics import Metrics
from model.steering import NAME_RE, SUFFIX, SteeringFileError, SteeringVector, load_vector, save_vector

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int, int]  # inode, mtime_ns, ctime_ns, size: a replaced or rewritten file differs


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def not_found(name: str, field: str) -> APIError:
    """The 400 (in a request that uses it) for a steering vector name that is not stored."""
    return APIError(
        400,
        f"{field}: no steering vector named {name[:64]!r}; GET /steering/vectors lists them",
        param=field,
        code="steering_vector_not_found",
    )


class SteeringStore:
    """Named steering vectors. `open` (at start) loads the folder; the routes call `list`, `get`, `put`, `delete`
    (from a thread: they may touch files); a request's intervention resolves names through `lookup`."""

    def __init__(self, directory: Path | None, max_vectors: int, metrics: Metrics | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_vectors = max_vectors
        self.metrics = metrics
        self._lock = threading.RLock()
        self._vectors: dict[str, SteeringVector] = {}
        self._stamps: dict[str, Stamp] = {}  # the file each vector was read from, as it was then
        self._refused: dict[str, Stamp] = {}  # bad files, logged once until they change
        self._models: tuple[str, ...] = ()

    def open(self, models: Iterable[str]) -> None:
        """Create the folder if needed and load it (a bad file is logged with its name and skipped); `models` are
        the served model names, the only label values of the stored-vectors gauge."""
        self._models = tuple(models)
        with self._lock:
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._sync_all()
                log.info("%d steering vectors in %s", len(self._vectors), self.directory)
            self._update_gauge()

    # --- reads --------------------------------------------------------------------------------------------------

    def list(self) -> list[SteeringVector]:
        """Every stored vector, by name."""
        with self._lock:
            self._sync_all()
            self._update_gauge()
            return [self._vectors[n] for n in sorted(self._vectors)]

    def get(self, name: str) -> SteeringVector | None:
        """The vector called `name`, or None."""
        if not NAME_RE.fullmatch(name):
            return None
        with self._lock:
            self._sync_one(name)
            return self._vectors.get(name)

    def lookup(self, model: str, checkpoint_sha256: str, name: str, field: str) -> torch.Tensor:
        """The vector `name` (float32, (d_model,), a copy) for a request on `model` whose checkpoint is
        `checkpoint_sha256`; an APIError 400 with `param=field` when no such vector is stored or it was made for
        another model or checkpoint."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise not_found(str(name), field)
        vec = self.get(name)
        if vec is None:
            raise not_found(name, field)
        if vec.model != model or vec.checkpoint_sha256 != checkpoint_sha256:
            raise APIError(
                400,
                f"{field}: steering vector {name!r} was made for model {vec.model!r} (checkpoint "
                f"{vec.checkpoint_sha256[:12]}), not model {model!r} (checkpoint {checkpoint_sha256[:12]}); make it "
                "again for this model",
                param=field,
                code="steering_vector_model_mismatch",
            )
        return vec.vector.clone()

    # --- writes -------------------------------------------------------------------------------------------------

    def put(self, vec: SteeringVector, replace: bool = False) -> None:
        """Store `vec` under its name: 409 if the name is taken and not `replace`, 400 when full
        (SHORTCUT_STEERING_MAX_VECTORS)."""
        with self._lock:
            self._sync_all()
            self.check_room(vec.name, replace)
            if self.directory is None:
                self._vectors[vec.name] = vec
            else:
                path = self._path(vec.name)
                try:
                    save_vector(path, vec, exclusive=not replace)
                except FileExistsError:
                    raise _exists(vec.name) from None
                self._vectors[vec.name] = vec
                self._stamps[vec.name] = _stamp(path.stat())
                self._refused.pop(vec.name, None)
            self._update_gauge()

    def check_room(self, name: str, replace: bool) -> None:
        """Raise the 409 or 400 that `put(name, replace)` would (before a computation that would be wasted)."""
        with self._lock:
            if name not in self._vectors and self.directory is not None:
                self._sync_one(name)
            if name in self._vectors:
                if not replace:
                    raise _exists(name)
                return
            if len(self._vectors) >= self.max_vectors:
                raise APIError(
                    400,
                    f"{len(self._vectors)} steering vectors are stored, the most the server keeps "
                    f"(SHORTCUT_STEERING_MAX_VECTORS={self.max_vectors}); delete one first",
                    param="name",
                    code="steering_store_full",
                )

    def delete(self, name: str) -> bool:
        """Remove the vector `name`; False if there was none."""
        if not NAME_RE.fullmatch(name):
            return False
        with self._lock:
            found = self._vectors.pop(name, None) is not None
            self._stamps.pop(name, None)
            if self.directory is not None:
                try:
                    self._path(name).unlink()
                    found = True
                except FileNotFoundError:
                    pass  # another replica deleted it first: gone either way
                self._refused.pop(name, None)
            self._update_gauge()
            return found

    # --- the folder ---------------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        assert self.directory is not None and NAME_RE.fullmatch(name)
        return self.directory / (name + SUFFIX)

    def _sync_one(self, name: str) -> None:
        """Bring `name` up to date with its file (the lock is held)."""
        if self.directory is None:
            return
        path = self._path(name)
        try:
            stamp = _stamp(path.stat())
        except FileNotFoundError:
            self._vectors.pop(name, None)
            self._stamps.pop(name, None)
            self._refused.pop(name, None)
            return
        except OSError as e:
            log.warning("cannot stat steering vector file %r: %s; keeping what was read before", str(path), e)
            return
        if self._stamps.get(name) == stamp or self._refused.get(name) == stamp:
            return
        try:
            vec = load_vector(path)
        except SteeringFileError as e:
            log.error("skipping steering vector file %r: %s", str(path), str(e).removeprefix(f"{path}: "))
            self._vectors.pop(name, None)
            self._stamps.pop(name, None)
            self._refused[name] = stamp
            return
        self._vectors[name], self._stamps[name] = vec, stamp
        self._refused.pop(name, None)

    def _sync_all(self) -> None:
        """Bring every vector up to date with the folder (the lock is held)."""
        if self.directory is None:
            return
        try:
            files = [e.name for e in os.scandir(self.directory) if e.name.endswith(SUFFIX)]
        except OSError as e:
            log.warning("cannot read the steering folder %r: %s; keeping what was read before", str(self.directory), e)
            return
        names = set()
        for file in files:
            name = file.removesuffix(SUFFIX)
            if not NAME_RE.fullmatch(name):
                if file not in self._refused:
                    log.error("skipping file %r in the steering folder: not <name>.safetensors with a valid name", file)
                    self._refused[file] = (0, 0, 0, 0)
                continue
            names.add(name)
            self._sync_one(name)
        for gone in set(self._vectors) - names:
            self._vectors.pop(gone, None)
            self._stamps.pop(gone, None)

    def _update_gauge(self) -> None:
        if self.metrics is None:
            return
        counts = dict.fromkeys(self._models, 0)
        for vec in self._vectors.values():
            if vec.model in counts:
                counts[vec.model] += 1
        for model, n in counts.items():
            self.metrics.steering_vectors.labels(model).set(n)


def _exists(name: str) -> APIError:
    return APIError(
        409,
        f'a steering vector named {name!r} exists; send "replace": true to overwrite it',
        param="name",
        code="steering_vector_exists",
    )
