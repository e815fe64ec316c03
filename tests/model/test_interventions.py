"""Per-request interventions and the per-token trace: decode step = reference forward, batch isolation, trace =
diagnostics."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from model import tokenizer
from model.config import ModelConfig
from model.decode import FastDecoder
from model.diagnostics import DiagnosticsOptions, run_diagnostics
from model.edits import Intervention, StreamEdits
from model.engine import Engine, EngineObserver, InvalidRequestError, SamplingParams
from model.kv_cache import KVCache
from model.transformer import Transformer
from tests.conftest import TINY, build_model
from tests.model.test_engine import events_of, ids, run_with_engine

PROMPT = tokenizer.encode("Residual")  # 8 tokens
SKIP0 = Intervention(skip=((0, "block"),))
MIXED = Intervention(skip=((1, "mlp"),), scale=((0, "attn", 0.5), (2, "block", -1.5)))


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(ModelConfig(**TINY), seed=0)


def test_gates_follow_the_entries() -> None:
    g = MIXED.compile(3).gates[0]
    assert g.tolist() == [[0.5, 1.0], [1.0, 0.0], [-1.5, -1.5]]
    assert Intervention(skip=((0, "attn"),), scale=((0, "block", 2.0),)).compile(1).gates[0].tolist() == [[0.0, 2.0]]
    assert MIXED.parts() == {"mlp", "attn", "block"} and MIXED.layers() == {0, 1, 2}


@pytest.mark.parametrize(
    ("iv", "field"),
    [
        (Intervention(skip=((3, "block"),)), "intervention.skip[0].layer"),
        (Intervention(skip=((-1, "block"),)), "intervention.skip[0].layer"),
        (Intervention(skip=((0, "block"), (1, "ffn"))), "intervention.skip[1].part"),
        (Intervention(scale=((0, "mlp", 100.5),)), "intervention.scale[0].factor"),
        (Intervention(scale=((0, "mlp", float("nan")),)), "intervention.scale[0].factor"),
        (Intervention(scale=((0, "mlp", float("inf")),)), "intervention.scale[0].factor"),
        (Intervention(skip=((1, "mlp"),), scale=((1, "mlp", 2.0),)), "intervention.scale[0]"),
        (Intervention(skip=((1, "mlp"), (1, "mlp"))), "intervention.skip[1]"),
    ],
)
def test_problems_name_the_entry(iv: Intervention, field: str) -> None:
    problem = iv.problem(3)
    assert problem is not None and problem[0] == field
    assert MIXED.problem(3) is None and Intervention(scale=((0, "mlp", -100.0),)).problem(1) is None


@pytest.mark.parametrize("variant", [{}, {"residual": False}, {"bias": False}])
def test_gated_decode_step_matches_the_gated_reference_forward(variant: dict) -> None:
    """Rows with different gates (none, a skip, scales) in one batch, decoded to the end of the window."""
    model = build_model(dataclasses.replace(ModelConfig(**TINY), **variant), seed=3)
    cfg = model.config
    gates = torch.stack(
        [torch.ones(cfg.n_layer, 2), SKIP0.compile(cfg.n_layer).gates[0], MIXED.compile(cfg.n_layer).gates[0]]
    )  # (3, L, 2)
    fast = FastDecoder(model)
    seqs = torch.randint(0, 256, (3, cfg.block_size), generator=torch.Generator().manual_seed(4))
    cache, fast_cache = KVCache(cfg, 3), KVCache(cfg, 3)
    lengths = torch.tensor([1, 5, 9])
    with torch.no_grad():
        for b, n in enumerate(lengths.tolist()):
            for c in (cache, fast_cache):
                model(
                    seqs[b : b + 1, :n],
                    cache=c.rows(b, b + 1),
                    pos=torch.tensor([0]),
                    edits=StreamEdits(gates[b : b + 1]),
                )
    pos = lengths.clone()
    while int(pos.max()) < cfg.block_size:
        tokens = seqs[torch.arange(3), pos]  # (3,)
        with torch.no_grad():
            ref = model(tokens[:, None], cache=cache, pos=pos, edits=StreamEdits(gates), return_resid=True)
        got = fast(tokens, fast_cache, pos, StreamEdits(gates), torch.tensor([0, 2]))
        torch.testing.assert_close(got.logits, ref.logits[:, -1], atol=1e-4, rtol=0)
        want = torch.stack([ref.resid[0]["resid_pre"][:, 0]] + [r["resid_post"][:, 0] for r in ref.resid])  # (L+1,3,C)
        torch.testing.assert_close(got.stream, want[:, [0, 2]], atol=1e-4, rtol=1e-5)
        pos = pos + 1
    # the gates matter: without them the intervened rows decode differently
    ungated = model(seqs[1:2, :9]).logits[0, -1]
    assert (ungated - model(seqs[1:2, :9], edits=StreamEdits(gates[1:2])).logits[0, -1]).abs().max() > 1e-2


def test_skipped_part_is_the_identity_in_a_plain_stack_too() -> None:
    model = build_model(dataclasses.replace(ModelConfig(**TINY), residual=False), seed=5)
    idx = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model(idx, edits=Intervention(skip=((1, "block"),)).compile(3), return_resid=True)
    assert torch.equal(out.resid[1]["resid_post"], out.resid[1]["resid_pre"])
    assert not out.resid[1]["attn_out"].any() and not out.resid[1]["mlp_out"].any()


def _generate(engine: Engine, prompt: list[int], **params) -> asyncio.Future:
    return asyncio.ensure_future(events_of(engine.submit(prompt, SamplingParams(**params))))


@pytest.mark.parametrize("decode_backend", ["torchscript", "auto"])  # auto: the fused C step where it is built
@pytest.mark.parametrize("decode_weights", ["float32", "auto"])
def test_intervened_rows_do_not_change_their_neighbours(
    model: Transformer, decode_weights: str, decode_backend: str
) -> None:
    base = dict(max_new_tokens=20, temperature=0.9, seed=7)

    async def alone(engine: Engine):
        return await _generate(engine, PROMPT, **base)

    async def mixed(engine: Engine):
        futs = [
            _generate(engine, tokenizer.encode("Shortcut!"), max_new_tokens=18, intervention=SKIP0, seed=1),
            _generate(engine, PROMPT, **base),
            _generate(engine, PROMPT, **base, intervention=MIXED),
            _generate(engine, PROMPT, max_new_tokens=12, temperature=0, intervention=SKIP0, trace=True),
        ]
        return await asyncio.gather(*futs)

    kw = {"decode_weights": decode_weights, "decode_backend": decode_backend}
    (tokens_alone, fin_alone) = run_with_engine(model, alone, **kw)
    results = run_with_engine(model, mixed, **kw)
    plain, intervened = results[1], results[2]
    assert ids(plain[0]) == ids(tokens_alone) and plain[1].text == fin_alone.text
    assert ids(intervened[0]) != ids(plain[0])  # same seed, different model: different text
    # deterministic: the intervened request gives the same tokens again, here alone
    again = run_with_engine(model, lambda e: _generate(e, PROMPT, **base, intervention=MIXED), **kw)
    assert ids(again[0]) == ids(intervened[0])


def test_greedy_intervened_generation_equals_the_gated_reference(model: Transformer) -> None:
    gates = MIXED.compile(model.config.n_layer)
    idx, want = list(PROMPT), []
    with torch.no_grad():
        for _ in range(16):
            tok = int(model(torch.tensor([idx]), edits=gates).logits[0, -1].argmax())
            want.append(tok)
            idx.append(tok)
    tokens, _ = run_with_engine(
        model, lambda e: _generate(e, PROMPT, max_new_tokens=16, temperature=0, intervention=MIXED)
    )
    assert ids(tokens) == want


@pytest.mark.parametrize("decode_backend", ["torchscript", "auto"])
@pytest.mark.parametrize(("decode_weights", "tol"), [("float32", 1e-4), ("auto", 3e-3)])
def test_trace_equals_diagnostics_per_token(
    model: Transformer, decode_weights: str, tol: float, decode_backend: str
) -> None:
    """The trace of token i is the stream at the position that produced it: /diagnostics on prompt + text."""
    n_new = 12

    async def body(engine: Engine):
        return await asyncio.gather(
            _generate(engine, PROMPT, max_new_tokens=n_new, temperature=0.8, seed=3, trace=True, logit_lens_top=2),
            _generate(engine, tokenizer.encode("plain row"), max_new_tokens=n_new, temperature=0.8, seed=4),
            _generate(engine, PROMPT, max_new_tokens=n_new, temperature=0.8, seed=5, trace=True, intervention=MIXED),
        )

    results = run_with_engine(model, body, decode_weights=decode_weights, decode_backend=decode_backend)
    assert all(t.trace is None for t in results[1][0])
    for (tokens, _), iv in ((results[0], None), (results[2], MIXED)):
        seq = PROMPT + ids(tokens)
        diag = run_diagnostics(model, seq[:-1], DiagnosticsOptions(per_token=True, logit_lens=2, intervention=iv))
        for i, t in enumerate(tokens):
            p = len(PROMPT) - 1 + i
            assert t.trace["position"] == p
            norms = [layer["resid_post"]["per_token"][p] for layer in diag["layers"]]
            ratios = [layer["update_ratio"]["per_token"]["block"][p] for layer in diag["layers"]]
            torch.testing.assert_close(torch.tensor(t.trace["resid_norm"]), torch.tensor(norms), rtol=tol, atol=tol)
            torch.testing.assert_close(torch.tensor(t.trace["update_ratio"]), torch.tensor(ratios), rtol=tol, atol=tol)
            assert ("logit_lens" in t.trace) == (iv is None)
        # the logit lens at the last traced position equals /diagnostics' lens of that prefix (last position)
        if iv is None:
            assert [[e["id"] for e in top] for top in tokens[-1].trace["logit_lens"]] == [
                [e["id"] for e in layer["logit_lens"]["top"]] for layer in diag["layers"]
            ]


def test_engine_rejects_what_it_cannot_apply(model: Transformer) -> None:
    async def body(engine: Engine):
        with pytest.raises(InvalidRequestError) as e:
            engine.submit(PROMPT, SamplingParams(intervention=Intervention(skip=((3, "mlp"),))))
        assert e.value.param == "intervention.skip[0].layer"
        with pytest.raises(InvalidRequestError) as e:
            engine.submit(PROMPT, SamplingParams(logit_lens_top=6))
        assert e.value.param == "logit_lens_top"

    run_with_engine(model, body, start=False)


class PartsRecorder(EngineObserver):
    def __init__(self) -> None:
        self.interventions: list[set[str]] = []

    def on_intervention(self, parts: set[str]) -> None:
        self.interventions.append(parts)


def test_interventions_are_reported_to_the_observer(model: Transformer) -> None:
    rec = PartsRecorder()
    run_with_engine(model, lambda e: _generate(e, PROMPT, max_new_tokens=2, intervention=MIXED), observer=rec)
    assert rec.interventions == [{"attn", "mlp", "block"}]
