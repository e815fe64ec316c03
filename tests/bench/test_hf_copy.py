"""The HF baseline computes our model's function: weight copy checked against independent forwards."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from bench import hf as hf_bench  # noqa: E402 - only once transformers is known to be there
from model.config import ModelConfig  # noqa: E402
from tests.conftest import TINY, build_model  # noqa: E402


@pytest.mark.parametrize("bias", [True, False])
def test_copied_gpt2_matches_logits(bias: bool) -> None:
    model = build_model(ModelConfig(**TINY, bias=bias), seed=3)
    hf = hf_bench.to_hf(model)
    eq = hf_bench.check_equivalence(model, hf, batch=2, seed=1)
    assert eq.allclose, eq
    assert eq.max_abs_diff < 1e-4
    assert eq.shape == (2, TINY["block_size"])


def test_check_detects_a_wrong_copy() -> None:
    model = build_model(seed=3)
    hf = hf_bench.to_hf(model)
    with torch.no_grad():  # an untransposed square weight: what forgetting Conv1D's layout would do
        hf.transformer.h[1].attn.c_proj.weight.copy_(model.blocks[1].attn.c_proj.weight)
    eq = hf_bench.check_equivalence(model, hf, batch=2, seed=1)
    assert not eq.allclose
    assert eq.max_abs_diff > 1e-3


def test_hf_generate_equals_our_greedy_decoding() -> None:
    model = build_model(seed=5)
    hf = hf_bench.to_hf(model)
    prompts = [[1, 2, 3, 4, 5, 6], [200, 100, 50, 25, 12, 6]]
    new, seconds, cpu = hf_bench.hf_generate(hf, prompts, max_new_tokens=10)
    assert new.shape == (2, 10) and seconds > 0 and cpu >= 0
    idx = torch.tensor(prompts)  # (2, 6)
    with torch.inference_mode():
        for _ in range(10):  # greedy by full recompute, no cache
            nxt = model(idx).logits[:, -1].argmax(-1, keepdim=True)  # (2, 1)
            idx = torch.cat([idx, nxt], dim=1)
    assert new.tolist() == idx[:, 6:].tolist()


def test_plain_stack_is_refused() -> None:
    with pytest.raises(ValueError, match="residual"):
        hf_bench.to_hf(build_model(ModelConfig(**TINY, residual=False)))
