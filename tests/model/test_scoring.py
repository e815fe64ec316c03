"""Prompt scoring (the forward behind /v1/completions' echo with logprobs), checked against the model's logits."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.scoring import TokenScore, prompt_logprobs
from model.tokenizer import encode
from model.transformer import Transformer
from tests.helpers import run_job


def _run(model: Transformer, ids: list[int], k: int) -> list[TokenScore]:
    """The job run as Engine.run_job slices it, a forward of another prompt between every two slices: a slice is one
    block of the forward (n_layer yields), and the forwards between change nothing."""

    def forward() -> None:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))

    scores, slices = run_job(prompt_logprobs(model, ids, k), forward)
    assert slices == model.config.n_layer
    return scores


@pytest.mark.parametrize("k", [0, 1, 3])
def test_each_token_after_the_first_has_its_logprob_and_top_k(k: int) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(block_size=32, n_layer=2, n_head=4, d_model=32, d_ff=64)).eval()
    ids = encode("x + F(x)")
    scores = _run(model, ids, k)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert [s.token_id for s in scores] == ids
    assert scores[0] == TokenScore(ids[0], None, None)  # nothing predicts the first token
    for t, s in enumerate(scores[1:]):
        assert s.logprob == pytest.approx(logp[t, ids[t + 1]].item(), abs=1e-5)
        assert s.top is not None and len(s.top) == max(k, 1)
        best = logp[t].topk(max(k, 1))
        assert [i for i, _ in s.top] == best.indices.tolist()
        assert [lp for _, lp in s.top] == pytest.approx(best.values.tolist(), abs=1e-5)
