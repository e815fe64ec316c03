"""The fused C decode step (model/fast): the reference forward's numbers with gates and the trace, rows independent
of their batch, deterministic; and the fallback to the TorchScript step where it is not built."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.decode import FastDecoder, float16_weights_available
from model.edits import Intervention, StreamEdits
from model.fast import FusedDecoder, build, cpu_supported, fused_available, library_isa, make_decoder, supports
from model.kv_cache import KVCache
from model.transformer import Transformer
from tests.conftest import TINY, build_model

SKIP0 = Intervention(skip=((0, "block"),))
MIXED = Intervention(skip=((1, "mlp"),), scale=((0, "attn", 0.5), (2, "block", -1.5)))
TOL = {"float32": 1e-4, "float16": 3e-2}  # float16: block matrices rounded, against the float32 reference
# (weights, cache) -> tolerance. A float16 cache on both sides: a key a hair apart in float32 can round to a
# neighbouring float16 (1e-3 relative), and float16 weights put more keys a hair apart.
KV_TOL = {
    ("float32", torch.float32): 1e-4,
    ("float16", torch.float32): 3e-2,
    ("float32", torch.float16): 3e-3,
    ("float16", torch.float16): 5e-2,
}


def _built(tmp_path_factory: pytest.TempPathFactory, isa: str) -> Path:
    """The `isa` build from source for this test module (skips where there is no compiler or CPU for it)."""
    if not cpu_supported(isa):
        pytest.skip(f"this CPU cannot run the {isa} build")
    out = build(tmp_path_factory.mktemp("fused") / f"fused_{isa}.so", isa=isa)
    if out is None:
        pytest.skip("no C compiler")
    assert library_isa(out) == isa
    return out


@pytest.fixture(scope="module", params=["avx2", "avx512"])
def library(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each build of the library in turn: every test that takes it runs on both."""
    return _built(tmp_path_factory, request.param)


def _prefilled(
    model: Transformer,
    seqs: torch.Tensor,
    lengths: list[int],
    gates: torch.Tensor,
    n_caches: int,
    kv: torch.dtype = torch.float32,
) -> list[KVCache]:
    caches = [KVCache(model.config, len(lengths), dtype=kv) for _ in range(n_caches)]
    with torch.no_grad():
        for b, n in enumerate(lengths):
            for c in caches:
                model(
                    seqs[b : b + 1, :n],
                    cache=c.rows(b, b + 1),
                    pos=torch.tensor([0]),
                    edits=StreamEdits(gates[b : b + 1]),
                )
    return caches


@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
@pytest.mark.parametrize("weights", ["float32", "float16"])
@pytest.mark.parametrize("variant", [{}, {"residual": False}, {"bias": False}, {"n_head": 1}])  # n_head 1: head_dim 32
def test_fused_step_matches_the_gated_reference_forward(
    library: Path, weights: str, variant: dict, kv: torch.dtype
) -> None:
    """Five rows (the 4-row and the 1-row kernels) with different gates, decoded to the end of the window; the
    reference forward reads and writes a cache of the same dtype (float16: keys/values rounded when written)."""
    model = build_model(dataclasses.replace(ModelConfig(**TINY), **variant), seed=3)
    cfg = model.config
    L = cfg.n_layer
    gates = torch.stack(
        [
            torch.ones(L, 2),
            SKIP0.compile(L).gates[0],
            MIXED.compile(L).gates[0],
            torch.ones(L, 2),
            MIXED.compile(L).gates[0],
        ]
    )
    fused = FusedDecoder(model, weights=weights, library=library)
    seqs = torch.randint(0, 256, (5, cfg.block_size), generator=torch.Generator().manual_seed(4))
    lengths = [1, 5, 9, 2, 17]  # tails of 1..7 keys and whole blocks of 8 in the attention
    cache, fused_cache = _prefilled(model, seqs, lengths, gates, 2, kv)
    tol = KV_TOL[weights, kv]
    pos = torch.tensor(lengths)
    traced = torch.tensor([0, 2, 4])
    while int(pos.max()) < cfg.block_size:
        tokens = seqs[torch.arange(5), pos]  # (5,)
        with torch.no_grad():
            ref = model(tokens[:, None], cache=cache, pos=pos, edits=StreamEdits(gates), return_resid=True)
        got = fused(tokens, fused_cache, pos, StreamEdits(gates), traced)
        torch.testing.assert_close(got.logits, ref.logits[:, -1], atol=tol, rtol=0)
        want = torch.stack([ref.resid[0]["resid_pre"][:, 0]] + [r["resid_post"][:, 0] for r in ref.resid])  # (L+1,5,C)
        torch.testing.assert_close(got.stream, want[:, traced], atol=tol, rtol=1e-3)
        pos = pos + 1
    assert fused_cache.k.dtype == kv
    torch.testing.assert_close(fused_cache.k, cache.k, atol=tol, rtol=1e-3)  # the cache written alike
    torch.testing.assert_close(fused_cache.v, cache.v, atol=tol, rtol=1e-3)


def test_float16_fused_step_equals_the_torchscript_float16_step(library: Path) -> None:
    if not float16_weights_available():
        pytest.skip("no FBGEMM")
    model = build_model(seed=6)
    cfg = model.config
    ref, fused = FastDecoder(model, weights="float16"), FusedDecoder(model, weights="float16", library=library)
    tokens = torch.tensor([3, 77, 250])
    for p in (0, 7, 8, 20, cfg.block_size - 1):
        pos = torch.full((3,), p)
        c1, c2 = KVCache(cfg, 3), KVCache(cfg, 3)
        for c in (c1, c2):
            c.k.normal_(generator=torch.Generator().manual_seed(p))
            c.v.normal_(generator=torch.Generator().manual_seed(p + 1))
        torch.testing.assert_close(fused(tokens, c2, pos).logits, ref(tokens, c1, pos).logits, atol=1e-4, rtol=0)


def test_a_rows_numbers_do_not_depend_on_its_batch_and_repeat(library: Path) -> None:
    """Bitwise: a row alone, or at any place in batches of 3 and 6 next to other rows and positions, twice."""
    model = build_model(seed=8)
    cfg = model.config
    fused = FusedDecoder(model, weights="float16", library=library)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(cfg.n_layer, 6, cfg.n_head, cfg.block_size, cfg.head_dim, generator=gen).unbind(1)
    v = torch.randn(cfg.n_layer, 6, cfg.n_head, cfg.block_size, cfg.head_dim, generator=gen).unbind(1)
    tokens, pos = torch.tensor([5, 9, 200, 31, 64, 128]), torch.tensor([3, 17, 30, 8, 0, 11])
    gates = torch.rand(6, cfg.n_layer, 2, generator=gen)

    def run(rows: list[int]) -> torch.Tensor:
        cache = KVCache(cfg, len(rows))
        for i, r in enumerate(rows):
            cache.k[:, i], cache.v[:, i] = k[r], v[r]
        idx = torch.tensor(rows)
        out = fused(tokens[idx], cache, pos[idx], StreamEdits(gates[idx]), torch.arange(len(rows)))
        return torch.cat([out.logits, out.stream.transpose(0, 1).flatten(1)], dim=1)  # (B, V + (L+1) C)

    alone = torch.cat([run([r]) for r in range(6)])
    assert torch.equal(run(list(range(6))), alone)  # and again: deterministic
    assert torch.equal(run([5, 4, 3, 2, 1, 0]), alone.flip(0))
    assert torch.equal(run([2, 0, 4]), alone[[2, 0, 4]])
    cache = KVCache(cfg, 6)  # gates of 1 are no gates at all
    ones = fused(tokens, cache, pos, StreamEdits(torch.ones(6, cfg.n_layer, 2))).logits
    assert torch.equal(fused(tokens, cache, pos).logits, ones)


def test_fused_step_rejects_bad_input(library: Path) -> None:
    model = build_model(seed=2)
    cfg = model.config
    fused = FusedDecoder(model, library=library)
    tok = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="positions"):
        fused(tok, KVCache(cfg, 2), torch.tensor([0, cfg.block_size]))
    with pytest.raises(ValueError, match="vocabulary"):
        fused(torch.tensor([0, 256]), KVCache(cfg, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        fused(tok, KVCache(cfg, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="gates"):
        fused(tok, KVCache(cfg, 2), torch.zeros(2, dtype=torch.long), StreamEdits(torch.ones(2, 1, 2)))
    with pytest.raises(ValueError, match="cache"):
        fused(tok, KVCache(cfg, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    cache = KVCache(cfg, 2)
    for bad in ({"pos": torch.tensor([-1, 0])}, {"tokens": torch.tensor([3, -5])}, {"trace_rows": torch.tensor([2])}):
        args = {"tokens": torch.tensor([1, 2]), "pos": torch.tensor([0, 1]), **bad}
        with pytest.raises(ValueError, match="positions|vocabulary|trace_rows"):
            fused(args["tokens"], cache, args["pos"], trace_rows=args.get("trace_rows"))
    assert not cache.k.any() and not cache.v.any()  # refused before anything was written
    view = KVCache(cfg, 4).rows(1, 3)  # rows of a larger cache: fine
    assert fused(tok, view, torch.zeros(2, dtype=torch.long)).logits.shape == (2, 256)


def test_unsupported_shapes_and_missing_library_fall_back_to_torchscript(tmp_path: Path) -> None:
    odd = build_model(ModelConfig(n_layer=1, n_head=2, d_model=24, d_ff=48, block_size=8), seed=0)
    assert not supports(odd.config)
    assert isinstance(make_decoder(odd, "float32", "auto"), FastDecoder)
    model = build_model(seed=0)
    missing = tmp_path / "none.so"
    assert not fused_available(missing)
    dec = make_decoder(model, "float32", "auto", library=missing)
    assert isinstance(dec, FastDecoder) and dec.scripted
    with pytest.raises(RuntimeError, match="unavailable"):
        make_decoder(model, "float32", "fused", library=missing)
    assert isinstance(make_decoder(model, "float32", "torchscript"), FastDecoder)
    with pytest.raises(ValueError, match="backend"):
        make_decoder(model, "float32", "tvm")


def test_auto_picks_the_fused_step_where_it_is_built(library: Path) -> None:
    model = build_model(seed=0)
    dec = make_decoder(model, "float16", "auto", library=library)
    assert isinstance(dec, FusedDecoder) and dec.weights == "float16"


def test_engine_with_the_fused_step_generates_what_the_torchscript_one_does(library: Path) -> None:
    """Greedy tokens, logprobs and traces of a batch with a plain, an intervened and a traced row."""
    import asyncio

    from model import tokenizer
    from model.engine import Engine, SamplingParams

    model = build_model(seed=0)

    def run(backend: str) -> list:
        async def main() -> list:
            engine = Engine(model, decode_weights="float32", decode_backend="torchscript")
            assert engine.decode_backend == "torchscript" and isinstance(engine.decode_step, FastDecoder)
            if backend == "fused":  # the test's library, not the installed one
                engine.runner.decode_step = FusedDecoder(model, weights="float32", library=library)
            engine.start()
            try:
                params = [
                    SamplingParams(max_new_tokens=20, temperature=0, logprobs=2),
                    SamplingParams(max_new_tokens=20, temperature=0, intervention=MIXED),
                    SamplingParams(max_new_tokens=20, temperature=0.9, seed=3, trace=True),
                ]
                hs = [
                    engine.submit(tokenizer.encode(t), p)
                    for t, p in zip(("Shortcut", "ab", "Residual"), params, strict=True)
                ]
                return [await asyncio.wait_for(h.result(), 20) for h in hs]
            finally:
                engine.stop()

        return asyncio.run(main())

    ts, fused = run("torchscript"), run("fused")
    for (a, _), (b, _) in zip(ts, fused, strict=True):
        assert [t.token_id for t in a] == [t.token_id for t in b]
        for x, y in zip(a, b, strict=True):
            if x.logprob is not None:
                assert abs(x.logprob - y.logprob) < 1e-4
            if x.trace is not None:
                torch.testing.assert_close(
                    torch.tensor(x.trace["resid_norm"]), torch.tensor(y.trace["resid_norm"]), rtol=1e-4, atol=1e-4
                )


def test_build_without_a_working_compiler_returns_none(tmp_path: Path) -> None:
    assert build(tmp_path / "x.so", compiler=str(tmp_path / "no-such-cc")) is None
    assert build(tmp_path / "x.so", compiler="false") is None  # a compiler that fails
    assert not (tmp_path / "x.so").exists()


def test_both_builds_give_the_same_numbers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The AVX2 and AVX-512 builds sum every output in the same order: bitwise-equal logits, stream and cache."""
    libs = [_built(tmp_path_factory, isa) for isa in ("avx2", "avx512")]
    model = build_model(seed=5)
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    tokens, pos = torch.randint(0, 256, (13,), generator=gen), torch.randint(0, cfg.block_size, (13,), generator=gen)
    gates = torch.rand(13, cfg.n_layer, 2, generator=gen)
    outs = []
    for lib in libs:
        for weights in ("float32", "float16"):
            for kv in (torch.float32, torch.float16):
                cache = KVCache(cfg, 13, dtype=kv)
                cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(7)))
                cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(8)))
                out = FusedDecoder(model, weights=weights, library=lib)(
                    tokens, cache, pos, StreamEdits(gates), torch.arange(13)
                )
                outs.append((out.logits, out.stream, cache.k.float(), cache.v.float()))
    half = len(outs) // 2
    for a, b in zip(outs[:half], outs[half:], strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_the_torchscript_engine_keeps_a_float32_cache() -> None:
    from model.engine import Engine

    model = build_model(seed=0)
    ts = Engine(model, decode_weights="float16", decode_backend="torchscript")
    assert ts.kv_cache_dtype == torch.float32 and ts.cache.k.dtype == torch.float32
    with pytest.raises(ValueError, match="fused"):
        Engine(model, decode_backend="torchscript", kv_cache_dtype="float16")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(model, kv_cache_dtype="int8")


@pytest.mark.skipif(not fused_available(), reason="the fused step is not built here (make builds it)")
def test_the_fused_float16_engine_caches_float16_keys() -> None:
    from model.engine import Engine

    model = build_model(seed=0)  # the installed build: the engine picks its own library
    fused = Engine(model, decode_weights="float16", decode_backend="fused")
    assert fused.kv_cache_dtype == torch.float16 and fused.cache.v.dtype == torch.float16
    assert Engine(model, decode_weights="float32", decode_backend="fused").kv_cache_dtype == torch.float32
    forced = Engine(model, decode_weights="float32", decode_backend="fused", kv_cache_dtype="float16")
    assert forced.cache.k.dtype == torch.float16


@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_prefill_through_the_step_matches_the_reference_forward(library: Path, weights: str, kv: torch.dtype) -> None:
    """A prompt as T rows sharing one cache row: the last position's logits and stream, and every key and value
    written, as the reference forward gives them with the same gates; then decoding on from that cache."""
    model = build_model(seed=11)
    cfg = model.config
    fused = FusedDecoder(model, weights=weights, library=library)
    tol = KV_TOL[weights, kv]
    seq = torch.randint(0, 256, (cfg.block_size,), generator=torch.Generator().manual_seed(5))
    for T, gates in (
        (1, None),
        (8, MIXED.compile(cfg.n_layer).gates[0]),
        (13, SKIP0.compile(cfg.n_layer).gates[0]),
        (cfg.block_size, None),
    ):
        ref_cache, cache = KVCache(cfg, 1, dtype=kv), KVCache(cfg, 1, dtype=kv)
        g = StreamEdits(gates[None]) if gates is not None else None
        with torch.no_grad():
            ref = model(seq[None, :T], cache=ref_cache, pos=torch.tensor([0]), edits=g, return_resid=True)
        got = fused.prefill(seq[:T], cache, g, trace=True)
        torch.testing.assert_close(got.logits, ref.logits[:, -1], atol=tol, rtol=0)
        want = torch.stack([ref.resid[0]["resid_pre"][0, -1]] + [r["resid_post"][0, -1] for r in ref.resid])
        torch.testing.assert_close(got.stream[:, 0], want, atol=tol, rtol=1e-3)
        torch.testing.assert_close(cache.k[:, :, :, :T].float(), ref_cache.k[:, :, :, :T].float(), atol=tol, rtol=1e-3)
        torch.testing.assert_close(cache.v[:, :, :, :T].float(), ref_cache.v[:, :, :, :T].float(), atol=tol, rtol=1e-3)
        assert not cache.k[:, :, :, T:].any()  # nothing written past the prompt
        if T < cfg.block_size:  # and a step on from there reads what the prefill wrote
            nxt, pos = seq[T : T + 1], torch.tensor([T])
            with torch.no_grad():
                ref_step = model(nxt[:, None], cache=ref_cache, pos=pos, edits=g).logits[:, -1]
            got_step = fused(nxt, cache, pos, g)
            torch.testing.assert_close(got_step.logits, ref_step, atol=tol, rtol=0)
    assert fused.prefill(seq[:5], KVCache(cfg, 1)).stream is None


def test_prefill_rejects_bad_input(library: Path) -> None:
    model = build_model(seed=2)
    cfg = model.config
    fused = FusedDecoder(model, library=library)
    for tokens, cache, gates in (
        (torch.zeros(0, dtype=torch.long), KVCache(cfg, 1), None),
        (torch.zeros(cfg.block_size + 1, dtype=torch.long), KVCache(cfg, 1), None),
        (torch.zeros(1, 4, dtype=torch.long), KVCache(cfg, 1), None),
        (torch.zeros(4, dtype=torch.long), KVCache(cfg, 2), None),
        (torch.zeros(4, dtype=torch.long), KVCache(cfg, 1), StreamEdits(torch.ones(2, cfg.n_layer, 2))),
    ):
        with pytest.raises(ValueError, match="prefill|gates"):
            fused.prefill(tokens, cache, gates)
    cache = KVCache(cfg, 1)
    with pytest.raises(ValueError, match="vocabulary"):
        fused.prefill(torch.tensor([1, 256]), cache)
    assert not cache.k.any()
