"""`python -m bench.ab_http`: both trees' servers answer streaming clients, and each round is counted per tree."""

from __future__ import annotations

from pathlib import Path

from bench import ab_http
from model.checkpoint import save_checkpoint
from tests.conftest import build_model

ROOT = Path(__file__).resolve().parents[2]


def test_compares_two_trees_by_tokens_and_server_cpu(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model(seed=0), path)
    res = ab_http.compare(
        {"base": ROOT, "head": ROOT}, clients=2, requests=1, rounds=2, new_tokens=5, checkpoint=path, prompt_bytes=6
    )
    for name in ("base", "head"):
        got = res[name]
        assert got["tok_s"] > 0 and got["server_cpu_ms_per_token"] > 0
        assert got["tok_s_range"][0] <= got["tok_s"] <= got["tok_s_range"][1]
    assert res["tok_s_head_over_base"] == res["head"]["tok_s"] / res["base"]["tok_s"]
