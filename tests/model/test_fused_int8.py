"""int8 weights in the fused step (`SHORTCUT_DECODE_WEIGHTS=int8`): logits, the traced stream and the stream edits
(skip / scale / add) against the reference forward with the same int8 scheme done in torch (`Int8Linear`: weights
per output column, each row of the input quantized alone, float64 sums), to INT8_TOL, and within a stated distance
of the float32 reference (FLOAT_TOL_STD, in standard deviations of its logits); the quality gate's scorer
(`training.evaluate --weights int8`) equal to the reference scorer in float32; int8 only with the fused step.

Tolerances: against the torch int8 scheme only the float order differs (and with it, rarely, an activation rounded
to the neighbouring level): INT8_TOL. Against float32, on these random-weight test models (logits ~2.5 std, wider
than a trained model's), the int8 rounding itself moves logits by up to ~0.25 std (measured; the shipped model's
val loss moves by 4e-6 nats/byte, docs/performance.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.edits import Intervention, StreamEdits
from model.fast import FusedDecoder, build, cpu_supported, make_decoder
from model.kv_cache import KVCache
from tests.conftest import TINY, build_model

INT8_TOL = 8e-2
FLOAT_TOL_STD = 0.4
WIDE = ModelConfig(**{**TINY, "d_model": 64, "d_ff": 192, "n_head": 4})


class Int8Linear(torch.nn.Module):
    """A Linear as the int8 step computes it, in torch: w ~ q * s per output column (|q| <= 127), each input row x ~
    xq * sx with sx = max |x| / 127; y = (xq . q) sx s + b, the sums in float64 (exact for these integers)."""

    def __init__(self, lin: torch.nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach().float()  # (out, in)
        self.s = w.abs().amax(dim=1) / 127
        self.q = torch.where(self.s[:, None] > 0, w / self.s[:, None].clamp_min(1e-30), 0).round().clamp(-127, 127)
        self.b = lin.bias.detach().float() if lin.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sx = x.abs().amax(dim=-1, keepdim=True) / 127
        xq = torch.where(sx > 0, x / sx.clamp_min(1e-30), 0).round().clamp(-127, 127)
        y = (xq.double() @ self.q.double().t()).float() * (sx * self.s)
        return y + self.b if self.b is not None else y


def int8_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every block Linear as `Int8Linear` (the tied unembedding stays float32, as in C)."""
    import copy

    ref = copy.deepcopy(model)
    for block in ref.blocks:
        for parent, name in (
            (block.attn, "c_attn"),
            (block.attn, "c_proj"),
            (block.mlp, "c_fc"),
            (block.mlp, "c_proj"),
        ):
            setattr(parent, name, Int8Linear(getattr(parent, name)))
    return ref


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not cpu_supported("avx2"):
        pytest.skip("this CPU cannot run the avx2 build")
    out = build(tmp_path_factory.mktemp("int8") / "fused.so")
    if out is None:
        pytest.skip("no C compiler")
    return out


@pytest.mark.parametrize("config", [WIDE, dataclasses.replace(WIDE, residual=False, bias=False)])
def test_int8_step_follows_the_reference_with_edits_and_trace(library: Path, config: ModelConfig) -> None:
    """Four rows (plain, skip, scale, add at prompt and generated positions) decoded from a prefilled cache: logits
    and the traced stream within INT8_TOL of the torch int8 reference with the same edits, every step, and within
    FLOAT_TOL_STD of the float32 one."""
    model = int8_reference(build_model(config, seed=12))
    f32 = build_model(config, seed=12)
    cfg = model.config
    L = cfg.n_layer
    ivs = [
        Intervention(),
        Intervention(skip=((1, "mlp"), (0, "attn"))),
        Intervention(scale=((0, "block", 0.5), (2, "attn", 1.5))),
        Intervention(),
    ]
    gates = torch.stack([iv.compile(L).gates[0] for iv in ivs])
    add = torch.zeros(4, L, 2, cfg.d_model)
    add[3, 1, 0] = 0.5 * torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(1))  # prompt positions
    add[3, 2, 1] = -0.5 * torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(2))  # generated ones
    n_prompt = torch.full((4,), 6)
    edits = StreamEdits(gates, add=add, n_prompt=n_prompt)
    seqs = torch.randint(0, 256, (4, cfg.block_size), generator=torch.Generator().manual_seed(3))
    ref_cache, cache, f32_cache = KVCache(cfg, 4), KVCache(cfg, 4), KVCache(cfg, 4)
    dec = FusedDecoder(f32, weights="int8", library=library)
    with torch.no_grad():
        for b in range(4):
            row = StreamEdits(gates[b : b + 1], add=add[b : b + 1], n_prompt=n_prompt[b : b + 1])
            model(seqs[b : b + 1, :6], cache=ref_cache.rows(b, b + 1), pos=torch.tensor([0]), edits=row)
            f32(seqs[b : b + 1, :6], cache=f32_cache.rows(b, b + 1), pos=torch.tensor([0]), edits=row)
            dec.prefill(seqs[b, :6], cache.rows(b, b + 1), row)
    pos = torch.full((4,), 6)
    traced = torch.tensor([1, 3])
    worst = 0.0
    for _ in range(10):
        tokens = seqs[torch.arange(4), pos]
        with torch.no_grad():
            ref = model(tokens[:, None], cache=ref_cache, pos=pos, edits=edits, return_resid=True)
            full = f32(tokens[:, None], cache=f32_cache, pos=pos, edits=edits).logits[:, -1]
        got = dec(tokens, cache, pos, edits, traced)
        want = torch.stack([ref.resid[0]["resid_pre"][:, 0]] + [r["resid_post"][:, 0] for r in ref.resid])
        torch.testing.assert_close(got.logits, ref.logits[:, -1], atol=INT8_TOL, rtol=0)
        torch.testing.assert_close(got.stream, want[:, traced], atol=INT8_TOL, rtol=0.01)
        assert float((got.logits - full).abs().max()) < FLOAT_TOL_STD * float(full.std())
        worst = max(worst, float((got.logits - full).abs().max()))
        pos = pos + 1
    assert worst > 4 * INT8_TOL  # int8 is not float32: the torch int8 scheme is what the tight bound holds to


def test_a_skipped_block_changes_the_int8_logits_as_it_changes_the_references(library: Path) -> None:
    """The edits act in the int8 step: skipping block 0 moves the logits as it moves the reference's."""
    f32 = build_model(WIDE, seed=5)
    model, cfg = int8_reference(f32), f32.config
    dec = FusedDecoder(f32, weights="int8", library=library)
    tokens, pos = torch.tensor([10, 20]), torch.tensor([0, 0])
    skip = StreamEdits(Intervention(skip=((0, "block"),)).compile(cfg.n_layer).gates.expand(2, -1, -1))
    with torch.no_grad():
        ref_plain = model(tokens[:, None], cache=KVCache(cfg, 2), pos=pos).logits[:, -1]
        ref_skip = model(tokens[:, None], cache=KVCache(cfg, 2), pos=pos, edits=skip).logits[:, -1]
    got_plain = dec(tokens, KVCache(cfg, 2), pos).logits
    got_skip = dec(tokens, KVCache(cfg, 2), pos, skip).logits
    torch.testing.assert_close(got_skip - got_plain, ref_skip - ref_plain, atol=2 * INT8_TOL, rtol=0)
    assert float((ref_skip - ref_plain).abs().max()) > 1  # the skip does move them


def test_int8_needs_the_fused_step(library: Path) -> None:
    model = build_model(seed=0)
    with pytest.raises(ValueError, match="int8 decode weights need the fused C step"):
        make_decoder(model, "int8", "torchscript")
    assert make_decoder(model, "int8", "fused", library=library).quantized  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="weights must be one of"):
        FusedDecoder(model, weights="int4", library=library)


def test_the_fused_scorer_is_the_reference_scorer(library: Path) -> None:
    """`training.evaluate`'s fused path (the quality gate's) scores what the reference scorer does: float32 weights
    to 1e-4 nats/byte (the same windows and targets), int8 close to it."""
    from training.evaluate import evaluate, evaluate_fused

    model = build_model(seed=9)
    data = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(4), dtype=torch.int64)
    ref = evaluate(model, data, batch_size=4)
    f32 = evaluate_fused(FusedDecoder(model, weights="float32", library=library), data)
    assert f32["bytes_scored"] == ref["bytes_scored"] == 299 and f32["windows"] == ref["windows"]
    assert abs(f32["nats_per_byte"] - ref["nats_per_byte"]) < 1e-4
    i8 = evaluate_fused(FusedDecoder(model, weights="int8", library=library, threads=2), data, torch.float16)
    assert 0 < abs(i8["nats_per_byte"] - ref["nats_per_byte"]) < 0.01


def test_an_int8_engine_generates_and_its_diagnostics_run_the_float32_reference(library: Path) -> None:
    """/diagnostics runs the engine's float32 model (a job on its worker), whatever the decode weights: equal to the
    reference computed directly."""
    import asyncio

    from model import tokenizer
    from model.diagnostics import DiagnosticsOptions, iter_diagnostics, run_diagnostics
    from model.engine import Engine, SamplingParams

    model = build_model(seed=0)
    ids = tokenizer.encode("To be")

    async def main() -> tuple[list, dict, dict]:
        engine = Engine(model, decode_weights="float32", decode_backend="torchscript")
        engine.runner.decode_step = FusedDecoder(model, weights="int8", library=library, threads=2)
        engine.start()
        try:
            h = engine.submit(ids, SamplingParams(max_new_tokens=8, temperature=0, trace=True))
            events, _ = await asyncio.wait_for(h.result(), 20)
            opts = DiagnosticsOptions(logit_lens=3, ablation=True)
            job = engine.run_job(lambda m: iter_diagnostics(m, ids, opts))
            diag = await asyncio.wait_for(asyncio.wrap_future(job), 20)
        finally:
            engine.stop()
        return events, diag, run_diagnostics(model, ids, DiagnosticsOptions(logit_lens=3, ablation=True))

    events, diag, direct = asyncio.run(main())
    assert len(events) == 8 and all(e.trace is not None for e in events)
    _assert_close(diag, direct)  # (the worker's torch threads may sum in another order: last-digit differences)


def _assert_close(got: object, want: object, path: str = "") -> None:
    """Equal structure and strings, numbers within 1e-4 relative / 1e-5 absolute."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            _assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), path
    else:
        assert got == want, path
