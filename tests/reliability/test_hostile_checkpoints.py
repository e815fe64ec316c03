"""Hostile checkpoint files: `python -m app` refuses each one before serving, with exactly one ERROR line that names
the file and the problem, a non-zero exit, and without running any code from the file.

All refusals start in parallel (each pays the interpreter and torch import once).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from safetensors.torch import load_file, save_file

from model.checkpoint import FORMAT, save_checkpoint
from tests.conftest import APP_CONFIG, build_model
from tests.reliability.conftest import REPO_ROOT, free_port, server_env


class Exploit:
    """Unpickling this object runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Outcome(NamedTuple):
    path: Path
    returncode: int
    stdout: str
    stderr: str


def _pickle(path: Path, marker: Path) -> None:
    # building the file is harmless; only loading it would run the command
    path.write_bytes(pickle.dumps({"state_dict": {}, "hook": Exploit(marker)}))


def _truncated(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tensors_and_header(good: Path) -> tuple[dict, dict[str, str]]:
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return load_file(good), json.loads(raw[8 : 8 + n])["__metadata__"]


def _wrong_shape(path: Path, good: Path) -> None:
    tensors, meta = _tensors_and_header(good)
    tensors["blocks.1.mlp.c_fc.weight"] = tensors["blocks.1.mlp.c_fc.weight"][:, :5].contiguous()
    save_file(tensors, str(path), metadata=meta)


def _lying_config(path: Path, good: Path) -> None:
    tensors, meta = _tensors_and_header(good)
    meta["config"] = json.dumps({**json.loads(meta["config"]), "n_layer": APP_CONFIG.n_layer + 1})
    save_file(tensors, str(path), metadata=meta)


def _huge_header(path: Path, good: Path) -> None:
    header = json.dumps({"__metadata__": {"format": FORMAT}}).encode()
    path.write_bytes(struct.pack("<Q", 2**40) + header + good.read_bytes()[8:4096])  # declares a 1 TiB header


# id -> (writer, expected words in the ERROR line)
CASES = {
    "pickle": (_pickle, ["not a safetensors file"]),
    "truncated": (_truncated, ["truncated"]),
    "wrong-shape": (_wrong_shape, ["blocks.1.mlp.c_fc.weight", "shape"]),
    "lying-config": (_lying_config, [f"n_layer={APP_CONFIG.n_layer + 1}", "do not match"]),
    "huge-header": (_huge_header, ["header too large"]),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Write every hostile file, start `python -m app` on each at once, collect exit code and output."""
    root = tmp_path_factory.mktemp("hostile_ckpt")
    good = root / "good.safetensors"
    save_checkpoint(build_model(APP_CONFIG, seed=3), good)
    procs = {}
    for name, (write, _) in CASES.items():
        path = root / f"{name}.safetensors"
        if name == "pickle":
            write(path, root / "pwned")
        else:
            write(path, good)
        cmd = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(free_port())]
        procs[name] = (
            path,
            subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=server_env(path, log_level="INFO"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    results = {}
    for name, (path, proc) in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = Outcome(path, proc.returncode, out, err)
    assert not (root / "pwned").exists(), "code from a checkpoint file ran"
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_refuses_to_start(outcomes: dict[str, Outcome], name: str) -> None:
    o = outcomes[name]
    assert o.returncode == 2, (o.returncode, o.stderr[-2000:])
    errors = [line for line in o.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, o.stderr
    line = errors[0]
    assert "cannot start" in line and str(o.path) in line, line
    for word in CASES[name][1]:
        assert word in line, line
    assert "Traceback" not in o.stderr and "Uvicorn running" not in o.stderr, o.stderr


def test_pickle_payload_never_ran(outcomes: dict[str, Outcome]) -> None:
    marker = outcomes["pickle"].path.parent / "pwned"
    assert outcomes["pickle"].returncode != 0
    assert not marker.exists()
    # the payload is live: unpickling it really would have created the marker (so the check above can fail)
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(Exploit(probe)))
    assert probe.exists()


def test_settings_the_engine_refuses_stop_the_start_with_one_line(tmp_path: Path) -> None:
    """A float16 KV cache asked of the TorchScript step: exit 2 with one clear ERROR line, no traceback."""
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model(APP_CONFIG, seed=0), path)
    env = server_env(path, log_level="INFO", decode_backend="torchscript", kv_cache_dtype="float16")
    cmd = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot start" in errors[0] and "float16 KV cache" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
