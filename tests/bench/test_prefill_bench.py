"""The `chunked` and `fairness` bench sections' measurements (bench/prefill.py) on a tiny model: every token is
counted, the newcomers arrive next to running streams, chunking is what changes between runs, and the small request
next to the largest starts within one row's lifetime."""

from __future__ import annotations

import time

import pytest

from bench import prefill
from model.config import ModelConfig
from model.engine import EngineObserver
from model.transformer import Transformer
from tests.conftest import build_model

CFG = ModelConfig(block_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(CFG, seed=0)


def test_long_prompts_next_to_streams_counts_every_token(model: Transformer, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks_run: list[tuple[int, int]] = []
    from model.engine.runner import ModelRunner

    real = ModelRunner.prefill_chunk

    def spy(self, req, row, start, stop, plan, want):  # noqa: ANN001, ANN202 - the runner's signature
        chunks_run.append((start, stop))
        return real(self, req, row, start, stop, plan, want)

    monkeypatch.setattr(ModelRunner, "prefill_chunk", spy)
    # a tiny model's step takes microseconds: held 3 ms, so the bench's event loop sees the streams' tokens in time
    monkeypatch.setattr(EngineObserver, "on_step", lambda self, batch_size: time.sleep(0.003))
    out = prefill.long_prompt_next_to_streams(
        model,
        [0, 8],
        streams=3,
        stream_prompt_len=8,
        stream_tokens=50,
        long_prompt_len=40,
        long_tokens=4,
        every=12,
        max_batch_size=4,
    )
    whole, chunked = out["chunk_0"], out["chunk_8"]
    for run in (whole, chunked):
        assert run["newcomers"] >= 2
        assert run["tokens"] == 3 * 50 + run["newcomers"] * 4  # every stream's and every newcomer's token came
        assert 0 < run["stream_gaps"] <= 3 * 49
        assert run["itl_p50_ms"] <= run["itl_p99_ms"] <= run["itl_max_ms"]
        assert run["newcomer_ttft_p50_ms"] > 0 and run["cpu_s"] > 0
    # only the chunked run chunks: each newcomer in 5 chunks of 8 (40 tokens)
    assert len(chunks_run) == 5 * chunked["newcomers"]
    assert sorted(set(chunks_run)) == [(s, s + 8) for s in range(0, 40, 8)]


def test_chunk_cost_covers_each_size(model: Transformer) -> None:
    out = prefill.chunk_cost(model, [4, 16], rows=3, reps=2)
    assert out["rows"] == 3 and out["decode_step_cpu_ms"] >= 0
    assert set(out) >= {"prefill_4_cpu_ms", "prefill_16_cpu_ms", "prefill_4_over_step", "prefill_16_over_step"}


def test_a_small_request_next_to_the_largest_starts_within_one_row(model: Transformer) -> None:
    """3 x n=4 rows of the whole window in 4 slots: FIFO would hold the small request for 3 waves of rows; fair
    admission gives it the first row that frees, within one row's lifetime of its sending."""
    out = prefill.small_next_to_largest(
        model, prompts=3, n=4, prompt_len=4, small_prompt_len=5, small_tokens=2, after_steps=5, max_batch_size=4
    )
    beside, alone = out["beside_largest"], out["alone"]
    row_steps = CFG.block_size - 4  # a big row's decode steps (its first token comes from its prefill)
    assert out["setup"]["big_rows"] == 12
    assert beside["sent_after_steps"] >= 5
    assert 0 < beside["ttft_decode_steps"] <= row_steps - beside["sent_after_steps"] + 1
    assert alone["ttft_decode_steps"] == 0 and alone["ttft_ms"] > 0  # prefilled before any decode step
