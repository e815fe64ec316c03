"""Named steering vectors across replicas: two live servers (`python -m app`) share one SHORTCUT_STEERING_DIR, and
`make scale-smoke`'s steering step (deploy/scale_client.py) passes against them: made through one, read and used by
name through both, deleted through one, gone from both."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.live_server import Server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pair(start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory) -> tuple[Server, Server]:
    shared = tmp_path_factory.mktemp("shared_steering")
    return start_server(steering_dir=shared), start_server(steering_dir=shared)


def test_the_scale_smoke_steering_step_passes_on_two_replicas(
    pair: tuple[Server, Server], capsys: pytest.CaptureFixture[str]
) -> None:
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import scale_client
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    a, b = pair
    code = scale_client.main(["steering", a.url, "--replica", f"a={a.url}", "--replica", f"b={b.url}", "--layer", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "made through the balancer" in out
    assert httpx.get(f"{b.url}/steering/vectors").json() == {"data": []}


def test_a_replica_that_does_not_share_the_folder_fails_the_step(
    pair: tuple[Server, Server], start_server: Callable[..., Server], capsys: pytest.CaptureFixture[str]
) -> None:
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import scale_client
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    alone = start_server()  # in memory only: it never sees the vector
    a, _ = pair
    code = scale_client.main(["steering", a.url, "--replica", f"a={a.url}", "--replica", f"alone={alone.url}"])
    assert code == 1
    assert "alone: GET after the create: 404" in capsys.readouterr().out
