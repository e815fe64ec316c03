"""Logit controls (logit_bias, presence/frequency/repetition penalties, min_p): the maths against plain per-token
references, and in the engine: greedy against a full-forward reference, seeded rows alone == inside a mixed batch."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from model import tokenizer
from model.config import ModelConfig
from model.engine import Engine, InvalidRequestError, SamplingParams
from model.sampling import (
    LogitControls,
    adjust_logits,
    apply_penalties,
    control_problem,
    min_p_filter,
    record_tokens,
    sample_rows,
)
from model.transformer import Transformer
from tests.conftest import TINY, build_model

V = 256
PROMPT = tokenizer.encode("Residual")


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(ModelConfig(**TINY), seed=0)


def reference_adjust(logits: list[float], prompt: list[int], generated: list[int], p: SamplingParams) -> list[float]:
    """One row, token by token: bias, then repetition (CTRL/HF), frequency and presence (OpenAI) penalties."""
    out = list(logits)
    for tok, b in p.logit_bias:
        out[tok] += max(-100.0, min(100.0, b))
    seen = set(prompt) | set(generated) if p.repetition_penalty != 1 else set(generated)
    for tok in range(len(out)):
        if tok in seen:
            out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
        c = generated.count(tok)
        out[tok] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return out


CONTROLS = {
    "presence": SamplingParams(presence_penalty=1.5),
    "frequency": SamplingParams(frequency_penalty=0.7),
    "repetition": SamplingParams(repetition_penalty=1.8),
    "repetition_below_1": SamplingParams(repetition_penalty=0.6),
    "logit_bias": SamplingParams(logit_bias=((101, 5.0), (32, -300.0), (7, 250.0))),
    "min_p": SamplingParams(min_p=0.2),
    "all": SamplingParams(
        presence_penalty=-0.5, frequency_penalty=0.3, repetition_penalty=1.3, min_p=0.05, logit_bias=((65, 2.0),)
    ),
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_adjust_logits_matches_a_per_token_reference(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [CONTROLS[name], SamplingParams(), CONTROLS["all"]]
    prompts = [[1, 2, 3, 200], [5, 5], [9, 101]]
    generated = [[2, 7, 7, 50], [1], [101, 101, 9]]
    controls = [LogitControls.create(p, s, V) for p, s in zip(prompts, params, strict=True)]
    assert controls[1] is None  # a request without controls carries no state
    for c, g in zip(controls, generated, strict=True):
        for tok in g:
            record_tokens([c], [tok])
    logits = torch.randn(3, V, generator=gen) * 3
    out = adjust_logits(logits, controls)
    for row, (p, s, g) in enumerate(zip(prompts, params, generated, strict=True)):
        g_row = g if controls[row] is not None else []
        expected = torch.tensor(reference_adjust(logits[row].tolist(), p, g_row, s))
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)


def test_no_controls_leaves_logits_untouched() -> None:
    logits = torch.randn(2, V)
    assert adjust_logits(logits, [None, None]) is logits


def test_logit_bias_is_clamped_to_100() -> None:
    c = LogitControls.create([1], SamplingParams(logit_bias=((3, 1e6), (4, -1e6), (5, 0.5))), V)
    assert c is not None and c.bias is not None
    assert c.bias[3] == 100 and c.bias[4] == -100 and c.bias[5] == 0.5 and c.bias.abs().sum() == 200.5


def test_penalties_are_batched_over_rows() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    counts = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    seen = torch.tensor([[True, True, False], [True, False, False]])
    out = apply_penalties(
        logits, counts, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([2.0, 4.0]), seen
    )
    torch.testing.assert_close(out, torch.tensor([[2 / 2 - 0.5 - 1, -2 * 2 - 1.0 - 1, 1.0], [0.5, -2.0, 1.0]]))


def test_min_p_filter_keeps_tokens_above_the_scaled_best() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    out = min_p_filter(probs.log(), torch.tensor([0.35, 0.0]))
    assert torch.isinf(out[0]).tolist() == [False, False, True, True]  # cut below 0.35 * 0.5 = 0.175
    assert not torch.isinf(out[1]).any()


def test_min_p_in_sample_rows_never_picks_a_cut_token() -> None:
    n = 1000
    base = torch.full((V,), -30.0)
    base[[10, 20, 30]] = torch.tensor([2.0, 1.0, 0.0])  # probs about .67, .24, .09
    logits = base.expand(n, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    out = sample_rows(
        logits, torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n), gens, torch.full((n,), 0.2)
    )
    assert set(out.tolist()) == {10, 20}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(presence_penalty=2.5), "presence_penalty"),
        (SamplingParams(frequency_penalty=-2.1), "frequency_penalty"),
        (SamplingParams(frequency_penalty=math.nan), "frequency_penalty"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(repetition_penalty=math.inf), "repetition_penalty"),
        (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(logit_bias=((256, 1.0),)), "logit_bias"),
        (SamplingParams(logit_bias=((-1, 1.0),)), "logit_bias"),
        (SamplingParams(logit_bias=((3, math.nan),)), "logit_bias"),
    ],
)
def test_out_of_range_controls_are_refused(model: Transformer, params: SamplingParams, field: str) -> None:
    assert control_problem(params, V)[1] == field
    engine = Engine(model, decode_weights="float32")
    with pytest.raises(InvalidRequestError) as info:
        engine.validate(PROMPT, params)
    assert info.value.param == field


def run(model: Transformer, jobs: list[tuple[list[int], SamplingParams]], max_batch_size: int = 8) -> list[list[int]]:
    """Submit every job at once to a fresh engine; return each one's token ids."""

    async def main() -> list[list[int]]:
        engine = Engine(model, decode_weights="float32", max_batch_size=max_batch_size)
        handles = [engine.submit(p, s) for p, s in jobs]
        engine.start()
        try:
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout=60)
        finally:
            engine.stop()
        return [[t.token_id for t in tokens] for tokens, _ in results]

    return asyncio.run(main())


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], n: int, p: SamplingParams) -> list[int]:
    """Greedy with a full forward per step and the per-token reference controls."""
    idx, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([idx])).logits[0, -1].tolist()
        adjusted = reference_adjust(logits, prompt, out, p)
        tok = max(range(len(adjusted)), key=adjusted.__getitem__)
        out.append(tok)
        idx.append(tok)
    return out


def test_greedy_with_controls_equals_the_reference(model: Transformer) -> None:
    names = ["presence", "frequency", "repetition", "logit_bias", "all"]
    jobs = [
        (PROMPT, SamplingParams(**{**CONTROLS[name].__dict__, "temperature": 0.0, "max_new_tokens": 12}))
        for name in names
    ]
    plain = SamplingParams(temperature=0.0, max_new_tokens=12)
    got = run(model, [*jobs, (PROMPT, plain)])
    for (prompt, params), tokens in zip(jobs, got, strict=False):
        assert tokens == greedy_reference(model, prompt, 12, params)
    assert any(tokens != got[-1] for tokens in got[:-1])  # the controls change the output


def test_seeded_rows_with_each_control_are_the_same_alone_and_in_a_mixed_batch(model: Transformer) -> None:
    targets = [
        (PROMPT, SamplingParams(**{**p.__dict__, "seed": 5 + i, "max_new_tokens": 16, "top_k": 40}))
        for i, p in enumerate(CONTROLS.values())
    ]
    others = [
        (
            tokenizer.encode(f"other {i}"),
            SamplingParams(
                max_new_tokens=4 + i,
                temperature=0.8 + 0.1 * i,
                repetition_penalty=1.0 + 0.2 * (i % 2),
                presence_penalty=0.3 * (i % 3),
            ),
        )
        for i in range(4)
    ]
    alone = [run(model, [job])[0] for job in targets]
    mixed = run(model, [others[0], *targets[:3], others[1], others[2], *targets[3:], others[3]], max_batch_size=5)
    assert mixed[1:4] + mixed[6:-1] == alone
    again = run(model, targets)
    assert again == alone
    plain = run(model, [(PROMPT, SamplingParams(seed=5 + i, max_new_tokens=16, top_k=40)) for i in range(len(targets))])
    assert sum(a != p for a, p in zip(alone, plain, strict=True)) >= len(targets) - 2  # the controls do something


def test_batches_without_controls_skip_them_and_give_what_neutral_controls_give(model: Transformer) -> None:
    """A batch where no row uses a control skips adjust_logits; a zero logit bias forces the controls path (bias,
    penalty tensors) with neutral values. Both give the same tokens, greedy and seeded, alone and mixed."""
    neutral = {"logit_bias": ((65, 0.0),)}
    kinds = [{"temperature": 0.0}, {"seed": 11, "top_k": 40}, {"seed": 12, "temperature": 0.7, "top_p": 0.9}]
    prompts = [tokenizer.encode(t) for t in ("Residual", "stream", "of thought")]
    plain = [(p, SamplingParams(max_new_tokens=14, **kw)) for p, kw in zip(prompts, kinds, strict=True)]
    with_neutral = [
        (p, SamplingParams(max_new_tokens=14, **kw, **neutral)) for p, kw in zip(prompts, kinds, strict=True)
    ]
    assert LogitControls.create(PROMPT, with_neutral[0][1], V) is not None  # the controls path really runs
    without = run(model, plain)  # no row has controls
    assert run(model, with_neutral) == without  # every row has (neutral) controls
    assert run(model, [plain[0], with_neutral[1], plain[2]]) == without  # mixed
    assert without[0] == greedy_reference(model, prompts[0], 14, plain[0][1])
