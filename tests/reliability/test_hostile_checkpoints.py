"""Hostile checkpoint files: `python -m app` refuses each one before serving, with exactly one ERROR line that names
the file and the problem, a non-zero exit, and without running any code from the file.

All refusals start in parallel (each pays the interpreter and torch import once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import re
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

from app import service
from app.metrics import Metrics
from model.checkpoint import FORMAT, CheckpointError, save_checkpoint
from model.config import ModelConfig
from model.decode import float16_weights_available
from model.engine import Engine, SamplingParams
from tests.conftest import APP_CONFIG, app_settings, build_model
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


def _config(path: Path, good: Path, slice_wpe: int | None = None, **fields: object) -> None:
    """`good` with its config's `fields` replaced (and wpe cut to `slice_wpe` rows, to match a smaller window)."""
    tensors, meta = _tensors_and_header(good)
    meta["config"] = json.dumps({**json.loads(meta["config"]), **fields})
    if slice_wpe is not None:
        tensors["wpe.weight"] = tensors["wpe.weight"][:slice_wpe].contiguous()
    save_file(tensors, str(path), metadata=meta)


def _config_text(path: Path, good: Path, text: str) -> None:
    tensors, meta = _tensors_and_header(good)
    meta["config"] = text
    save_file(tensors, str(path), metadata=meta)


def _deep_metadata(path: Path, good: Path) -> None:
    tensors, meta = _tensors_and_header(good)
    meta["metadata"] = '{"a":' + "[" * 900 + "]" * 900 + "}"  # parses; GET /info could not answer it
    save_file(tensors, str(path), metadata=meta)


# crafted configs (#24 item 6): id -> (writer, expected words in the error); every one is refused in-process by
# app.service.load_models (below), the first few by the CLI too
CONFIG_CASES = {
    "block-size-13": (lambda p, g: _config(p, g, 13, block_size=13), ["block_size 13 is under 14", "warm-up"]),
    "residual-null": (lambda p, g: _config(p, g, residual=None), ["residual must be true or false", "None"]),
    # 2,000,000 layers in a small file: refused from the tensor count, before 24,000,000 names are listed
    "n-layer-huge": (lambda p, g: _config(p, g, n_layer=2_000_000), ["n_layer=2000000", "implies 24000004 tensors"]),
    "metadata-deep": (_deep_metadata, ["nested more than 32 levels"]),
    "block-size-1": (lambda p, g: _config(p, g, 1, block_size=1), ["block_size 1 is under 14"]),
    "residual-list": (lambda p, g: _config(p, g, residual=[1]), ["residual must be true or false", "[1]"]),
    "bias-int": (lambda p, g: _config(p, g, bias=1), ["bias must be true or false"]),
    "n-layer-bool": (lambda p, g: _config(p, g, n_layer=True), ["n_layer must be an integer"]),
    "d-model-float": (lambda p, g: _config(p, g, d_model=16.0), ["d_model must be an integer"]),
    "dropout-string": (lambda p, g: _config(p, g, dropout="0.1"), ["dropout must be a number"]),
    "dropout-bool": (lambda p, g: _config(p, g, dropout=False), ["dropout must be a number"]),
    "config-list": (lambda p, g: _config_text(p, g, "[1]"), ["config is not a JSON object"]),
}
CLI_CONFIG_CASES = ["block-size-13", "residual-null", "n-layer-huge", "metadata-deep"]

# id -> (writer, expected words in the ERROR line)
CASES = {
    **{name: CONFIG_CASES[name] for name in CLI_CONFIG_CASES},
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
            out, err = proc.communicate(timeout=300)  # all start at once on a few cores
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


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_crafted_configs_are_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    """What the CLI turns into its one ERROR line: load_models raises CheckpointError naming the file, whether the
    file's own check (model.checkpoint) or the engine's refusal of it (a window under the warm-up's) finds it."""
    good = tmp_path / "good.safetensors"
    save_checkpoint(build_model(APP_CONFIG, seed=3), good)
    path = tmp_path / f"{name}.safetensors"
    CONFIG_CASES[name][0](path, good)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        service.load_models(app_settings(path), Metrics(), torch.device("cpu"))
    assert time.perf_counter() - start < 10  # no model of the declared size is built (2,000,000 layers: 42 s before)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for word in CONFIG_CASES[name][1]:
        assert word in message, message


def test_an_engine_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error making the engine (a KV cache that cannot be mapped, the fused step's refusal) names the file."""
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model(APP_CONFIG, seed=0), path)

    def no_map(*args: object, **kwargs: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr("model.kv_cache.mmap.mmap", no_map)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: .*Cannot allocate memory"):
        service.load_models(app_settings(path), Metrics(), torch.device("cpu"))


def test_the_fused_steps_refusal_names_the_file(tmp_path: Path) -> None:
    """SHORTCUT_DECODE_BACKEND=fused with a shape its kernels do not run: exit 2, one line naming the file."""
    path = tmp_path / "odd.safetensors"
    save_checkpoint(build_model(ModelConfig(n_layer=1, n_head=2, d_model=24, d_ff=48, block_size=32), seed=0), path)
    env = server_env(path, log_level="INFO", decode_backend="fused")
    cmd = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot start" in errors[0] and str(path) in errors[0], proc.stderr
    assert "fused" in errors[0] and "Traceback" not in proc.stderr


def test_weights_beyond_float16_decode_in_float32_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Finite float32 weights that float16 cannot hold (x1e7): `auto` decode weights fall back to float32 with a
    warning naming the weight (as float16 they were inf, and every token NaN); float16 asked for is refused."""
    model = build_model(APP_CONFIG, seed=0)
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight.mul_(1e7)
    path = tmp_path / "big.safetensors"
    save_checkpoint(model, path)
    with caplog.at_level(logging.WARNING, logger="model.decode"):
        served = service.load_models(app_settings(path), Metrics(), torch.device("cpu"))["tiny"]
    assert served.engine.decode_weights == "float32"
    if float16_weights_available():  # where float16 is what auto means otherwise
        assert "blocks.0.mlp.c_fc.weight" in caplog.text and "float16" in caplog.text, caplog.text
        with pytest.raises(CheckpointError, match="beyond float16's range"):
            service.load_models(app_settings(path, decode_weights="float16"), Metrics(), torch.device("cpu"))
    # and what it decodes is the reference forward's greedy token, a number (float16 made it NaN)
    engine = served.engine
    prompt = [72, 105]
    with torch.no_grad():
        logits = served.checkpoint.model(torch.tensor([prompt])).logits[0, -1]
    assert torch.isfinite(logits).all()  # in float32 the model's numbers are numbers
    expected = int(logits.argmax())
    engine.start()
    try:
        tokens = asyncio.run(_greedy(engine, prompt))
    finally:
        engine.stop()
    assert tokens == [expected]


async def _greedy(engine: Engine, prompt: list[int]) -> list[int]:
    events, _ = await asyncio.wait_for(
        engine.submit(prompt, SamplingParams(max_new_tokens=1, temperature=0.0)).result(), 60
    )
    return [e.token_id for e in events]
