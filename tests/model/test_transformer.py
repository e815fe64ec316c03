"""Transformer: shapes, KV-cache equivalence, residual-stream identities, ablations, no-shortcut mode, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.decode import FastDecoder, float16_weights_available
from model.edits import Intervention
from model.kv_cache import KVCache
from model.transformer import RESID_NAMES, Transformer, in_slices, parameter_shapes
from tests.helpers import run_job

ATOL = 1e-5


def _tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))  # (B, T)


def _embed(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    return model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))  # (B, T, C)


@torch.no_grad()
def test_shapes(tiny_model: Transformer) -> None:
    cfg = tiny_model.config
    idx = _tokens(2, 7)
    out = tiny_model(idx, return_resid=True)
    assert out.logits.shape == (2, 7, cfg.vocab_size)
    assert out.final.shape == (2, 7, cfg.d_model)
    assert len(out.resid) == cfg.n_layer
    for trace in out.resid:
        assert tuple(trace) == RESID_NAMES
        assert all(v.shape == (2, 7, cfg.d_model) for v in trace.values())
    plain = tiny_model(idx)
    assert plain.resid is None and plain.final is None
    assert torch.equal(plain.logits, out.logits)
    last = tiny_model(idx, last_only=True).logits
    assert last.shape == (2, 1, cfg.vocab_size)
    torch.testing.assert_close(last, out.logits[:, -1:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_logits_depend_on_context(tiny_model: Transformer) -> None:
    """Guards the equivalence tests below: a model that ignored context would pass them trivially."""
    a, b = _tokens(1, 8, seed=1), _tokens(1, 8, seed=2)
    b[0, -1] = a[0, -1]
    assert (tiny_model(a).logits[0, -1] - tiny_model(b).logits[0, -1]).abs().max() > 0.1


@torch.no_grad()
def test_kv_cache_step_by_step_matches_full_forward(tiny_model: Transformer) -> None:
    T = tiny_model.config.block_size
    idx = _tokens(2, T)
    full = tiny_model(idx).logits  # (2, T, V)
    cache = KVCache(tiny_model.config, 2)
    prefill = tiny_model(idx[:, :5], cache=cache, pos=torch.zeros(2, dtype=torch.long)).logits
    torch.testing.assert_close(prefill, full[:, :5], atol=ATOL, rtol=0)
    for t in range(5, T):
        step = tiny_model(idx[:, t : t + 1], cache=cache, pos=torch.full((2,), t), last_only=True).logits
        torch.testing.assert_close(step[:, 0], full[:, t], atol=ATOL, rtol=0)


@torch.no_grad()
def test_kv_cache_batched_rows_at_different_positions(tiny_model: Transformer) -> None:
    cfg = tiny_model.config
    lengths = [3, 9, 16]
    seqs = _tokens(3, cfg.block_size, seed=5)
    cache = KVCache(cfg, 3)
    for b, n in enumerate(lengths):  # each row prefilled on its own, through a view
        tiny_model(seqs[b : b + 1, :n], cache=cache.rows(b, b + 1), pos=torch.tensor([0]))
    pos = torch.tensor(lengths)
    while int(pos.max()) < cfg.block_size:
        idx = seqs[torch.arange(3), pos][:, None]  # (3, 1): next token of every row
        logits = tiny_model(idx, cache=cache, pos=pos).logits[:, 0]  # (3, V)
        for b in range(3):
            ref = tiny_model(seqs[b : b + 1, : int(pos[b]) + 1]).logits[0, -1]
            torch.testing.assert_close(logits[b], ref, atol=ATOL, rtol=0)
        pos = pos + 1


@torch.no_grad()
def test_kv_cache_multi_token_chunk_continuation(tiny_model: Transformer) -> None:
    cfg = tiny_model.config
    seqs = _tokens(2, 20, seed=7)
    full = tiny_model(seqs).logits  # (2, 20, V)
    cache = KVCache(cfg, 2)
    tiny_model(seqs[0:1, :5], cache=cache.rows(0, 1), pos=torch.tensor([0]))
    tiny_model(seqs[1:2, :9], cache=cache.rows(1, 2), pos=torch.tensor([0]))
    # Row 0 continues with a 4-token chunk alone, then both rows take a 4-token chunk at different positions.
    chunk = tiny_model(seqs[0:1, 5:9], cache=cache.rows(0, 1), pos=torch.tensor([5])).logits
    torch.testing.assert_close(chunk[0], full[0, 5:9], atol=ATOL, rtol=0)
    idx = torch.stack([seqs[0, 9:13], seqs[1, 9:13]])  # (2, 4)
    chunk = tiny_model(idx, cache=cache, pos=torch.tensor([9, 9])).logits
    torch.testing.assert_close(chunk, full[:, 9:13], atol=ATOL, rtol=0)
    cache2 = KVCache(cfg, 2)
    tiny_model(seqs[0:1, :2], cache=cache2.rows(0, 1), pos=torch.tensor([0]))
    tiny_model(seqs[1:2, :13], cache=cache2.rows(1, 2), pos=torch.tensor([0]))
    idx = torch.stack([seqs[0, 2:6], seqs[1, 13:17]])  # rows at positions 2 and 13
    chunk = tiny_model(idx, cache=cache2, pos=torch.tensor([2, 13])).logits
    torch.testing.assert_close(chunk[0], full[0, 2:6], atol=ATOL, rtol=0)
    torch.testing.assert_close(chunk[1], full[1, 13:17], atol=ATOL, rtol=0)


@torch.no_grad()
def test_residual_stream_identities(tiny_model: Transformer) -> None:
    idx = _tokens(2, 11)
    out = tiny_model(idx, return_resid=True)
    torch.testing.assert_close(out.resid[0]["resid_pre"], _embed(tiny_model, idx), atol=ATOL, rtol=0)
    for layer, tr in enumerate(out.resid):
        torch.testing.assert_close(tr["resid_mid"], tr["resid_pre"] + tr["attn_out"], atol=ATOL, rtol=0)
        torch.testing.assert_close(tr["resid_post"], tr["resid_mid"] + tr["mlp_out"], atol=ATOL, rtol=0)
        block = tiny_model.blocks[layer]
        attn = block.attn(block.ln_1(tr["resid_pre"]))
        torch.testing.assert_close(tr["attn_out"], attn, atol=ATOL, rtol=0)
        torch.testing.assert_close(tr["mlp_out"], block.mlp(block.ln_2(tr["resid_mid"])), atol=ATOL, rtol=0)
        if layer + 1 < len(out.resid):
            assert torch.equal(out.resid[layer + 1]["resid_pre"], tr["resid_post"])
    torch.testing.assert_close(out.final, tiny_model.ln_f(out.resid[-1]["resid_post"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, tiny_model.unembed(out.final), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, out.final @ tiny_model.wte.weight.T, atol=ATOL, rtol=0)


@torch.no_grad()
def test_ablating_every_block_leaves_the_embeddings_only_model(tiny_model: Transformer) -> None:
    idx = _tokens(2, 10)
    ablate = Intervention(skip=tuple((layer, "block") for layer in range(tiny_model.config.n_layer)))
    out = tiny_model(idx, edits=ablate.compile(tiny_model.config.n_layer), return_resid=True)
    expected = tiny_model.unembed(tiny_model.ln_f(_embed(tiny_model, idx)))
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
    assert all(torch.equal(tr["attn_out"], torch.zeros_like(tr["attn_out"])) for tr in out.resid)
    assert (out.logits - tiny_model(idx).logits).abs().max() > 0.1


def _skip_loop(model: Transformer, idx: torch.Tensor, layer: int, part: str) -> torch.Tensor:
    """Hand-written forward in which `part` of block `layer` is left out."""
    x = _embed(model, idx)
    for i, block in enumerate(model.blocks):
        if i != layer:
            x = block(x)
        elif part == "attn":
            x = x + block.mlp(block.ln_2(x))
        elif part == "mlp":
            x = x + block.attn(block.ln_1(x))
    return model.unembed(model.ln_f(x))


@pytest.mark.parametrize("part", ["block", "attn", "mlp"])
@torch.no_grad()
def test_ablating_one_component_equals_skipping_it(tiny_model: Transformer, part: str) -> None:
    idx = _tokens(2, 12)
    for layer in range(tiny_model.config.n_layer):
        out = tiny_model(idx, edits=Intervention(skip=((layer, part),)).compile(tiny_model.config.n_layer)).logits
        torch.testing.assert_close(out, _skip_loop(tiny_model, idx, layer, part), atol=ATOL, rtol=0)
        assert (out - tiny_model(idx).logits).abs().max() > 1e-3


@torch.no_grad()
def test_ablation_with_kv_cache_matches_full_forward(tiny_model: Transformer) -> None:
    idx = _tokens(1, 16)
    iv = Intervention(skip=((0, "attn"), (2, "block"))).compile(tiny_model.config.n_layer)
    full = tiny_model(idx, edits=iv).logits
    cache = KVCache(tiny_model.config, 1)
    tiny_model(idx[:, :6], cache=cache, pos=torch.tensor([0]), edits=iv)
    for t in range(6, 16):
        step = tiny_model(idx[:, t : t + 1], cache=cache, pos=torch.tensor([t]), edits=iv).logits
        torch.testing.assert_close(step[:, 0], full[:, t], atol=ATOL, rtol=0)


@torch.no_grad()
def test_no_residual_config_has_no_shortcut(make_model, tiny_config: ModelConfig) -> None:
    model = make_model(dataclasses.replace(tiny_config, residual=False))
    idx = _tokens(2, 9)
    x = _embed(model, idx)
    block = model.blocks[0]
    a = block.attn(block.ln_1(x))
    f = block.mlp(block.ln_2(a))
    torch.testing.assert_close(block(x), f, atol=ATOL, rtol=0)
    assert (block(x) - (x + a + block.mlp(block.ln_2(x + a)))).abs().max() > 0.1
    h = x
    for blk in model.blocks:  # plain composition of the sublayers
        h = blk.mlp(blk.ln_2(blk.attn(blk.ln_1(h))))
    out = model(idx, return_resid=True)
    torch.testing.assert_close(out.logits, model.unembed(model.ln_f(h)), atol=ATOL, rtol=0)
    for tr in out.resid:
        assert torch.equal(tr["resid_mid"], tr["attn_out"])
        assert torch.equal(tr["resid_post"], tr["mlp_out"])


@torch.no_grad()
def test_too_long_inputs_raise(tiny_model: Transformer) -> None:
    cfg = tiny_model.config
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model(_tokens(1, cfg.block_size + 1))
    tiny_model(_tokens(1, cfg.block_size))  # exactly block_size is fine
    cache = KVCache(cfg, 1)
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model(_tokens(1, 4), cache=cache, pos=torch.tensor([cfg.block_size - 3]))
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model(_tokens(1, 1), cache=cache, pos=torch.tensor([cfg.block_size]))
    with pytest.raises(ValueError, match="pos of shape"):
        tiny_model(_tokens(1, 1), cache=cache)
    with pytest.raises(ValueError, match="pos of shape"):
        tiny_model(_tokens(2, 1), cache=cache, pos=torch.tensor([0, 0]))


@pytest.mark.parametrize("variant", [{}, {"residual": False}, {"bias": False}])
def test_fast_decoder_matches_forward_for_rows_at_different_positions(make_model, tiny_config, variant) -> None:
    model = make_model(dataclasses.replace(tiny_config, **variant))
    cfg = model.config
    fast = FastDecoder(model)
    lengths = [1, 6, 13]
    seqs = _tokens(3, cfg.block_size, seed=9)
    cache, fast_cache = KVCache(cfg, 3), KVCache(cfg, 3)
    with torch.no_grad():
        for b, n in enumerate(lengths):
            for c in (cache, fast_cache):
                model(seqs[b : b + 1, :n], cache=c.rows(b, b + 1), pos=torch.tensor([0]))
    pos = torch.tensor(lengths)
    while int(pos.max()) < cfg.block_size:
        tokens = seqs[torch.arange(3), pos]  # (3,)
        with torch.no_grad():
            ref = model(tokens[:, None], cache=cache, pos=pos, last_only=True).logits[:, -1]
        got = fast(tokens, fast_cache, pos).logits
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)  # same maths, different op order
        pos = pos + 1
    torch.testing.assert_close(fast_cache.k, cache.k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast_cache.v, cache.v, atol=1e-5, rtol=1e-4)


def test_fast_decoder_works_through_a_row_view_and_rejects_bad_input(tiny_model: Transformer) -> None:
    cfg = tiny_model.config
    fast = FastDecoder(tiny_model)
    cache = KVCache(cfg, 4)
    seq = _tokens(1, 5, seed=3)
    with torch.no_grad():
        tiny_model(seq[:, :4], cache=cache.rows(2, 3), pos=torch.tensor([0]))
        ref = tiny_model(seq).logits[0, -1]
    got = fast(seq[0, 4:], cache.rows(2, 3), torch.tensor([4])).logits
    torch.testing.assert_close(got[0], ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="exceeds block_size"):
        fast(seq[0, :1], cache.rows(0, 1), torch.tensor([cfg.block_size]))
    with pytest.raises(ValueError, match="shape"):
        fast(seq[0, :2], cache.rows(0, 1), torch.tensor([0, 1]))


def test_at_returns_one_position_per_row(tiny_model: Transformer) -> None:
    seq = _tokens(3, 9, seed=5)
    at = torch.tensor([8, 0, 4])
    with torch.no_grad():
        full = tiny_model(seq, return_resid=True)
        got = tiny_model(seq, return_resid=True, at=at)
    rows = torch.arange(3)
    assert got.logits.shape == (3, 1, tiny_model.config.vocab_size)
    torch.testing.assert_close(got.logits[:, 0], full.logits[rows, at])
    for layer_full, layer_got in zip(full.resid, got.resid, strict=True):
        for name in RESID_NAMES:
            torch.testing.assert_close(layer_got[name][:, 0], layer_full[name][rows, at])
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 9, 1]), torch.tensor([-1, 0, 0])):
        with pytest.raises(ValueError, match="`at`"):
            tiny_model(seq, at=bad)
    with pytest.raises(ValueError, match="`at`"):
        tiny_model(seq, at=at, last_only=True)


def test_fast_decoder_shares_the_model_weights(tiny_model: Transformer, tmp_path) -> None:
    cfg = tiny_model.config
    seq = _tokens(1, 6, seed=4)
    with torch.no_grad():
        before = tiny_model(seq).logits
    fast = FastDecoder(tiny_model)
    fc = tiny_model.blocks[1].mlp.c_fc.weight
    assert fc.t().is_contiguous() and fast.w.layers[1].w_fc.data_ptr() == fc.data_ptr()  # one copy, (in, out)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(seq).logits, before, atol=1e-5, rtol=0)  # same values after re-layout
        fc.mul_(1.5)  # an in-place change through the model reaches the decoder
        cache = KVCache(cfg, 1)
        tiny_model(seq[:, :5], cache=cache, pos=torch.tensor([0]))
        ref = tiny_model(seq).logits[:, -1]
    torch.testing.assert_close(fast(seq[:, 5], cache, torch.tensor([5])).logits, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(ref, before[:, -1], atol=1e-3)
    save_checkpoint(tiny_model, tmp_path / "relaid.safetensors")  # the checkpoint writer copes with the layout
    torch.testing.assert_close(load_checkpoint(tmp_path / "relaid.safetensors").model.blocks[1].mlp.c_fc.weight, fc)


@pytest.mark.skipif(not float16_weights_available(), reason="needs a CPU build of torch with FBGEMM (x86)")
@pytest.mark.parametrize("script", [True, False])
def test_float16_weight_decoder_stays_close_to_float32(tiny_model: Transformer, script: bool) -> None:
    cfg = tiny_model.config
    exact, half = FastDecoder(tiny_model), FastDecoder(tiny_model, script=script, weights="float16")
    assert half.packed and not exact.packed
    caches = KVCache(cfg, 2), KVCache(cfg, 2)
    tokens, pos = torch.tensor([3, 7]), torch.tensor([0, 4])
    for _ in range(6):
        a, b = exact(tokens, caches[0], pos).logits, half(tokens, caches[1], pos).logits
        scale = float(a.abs().max())
        assert 0 < float((a - b).abs().max()) <= 2e-3 * scale  # rounded weights: close, not equal
        tokens, pos = a.argmax(-1), pos + 1
    with pytest.raises(ValueError, match="weights must be"):
        FastDecoder(tiny_model, weights="bfloat16")


def test_scripted_and_eager_decode_steps_agree(tiny_model: Transformer) -> None:
    cfg = tiny_model.config
    scripted, eager = FastDecoder(tiny_model), FastDecoder(tiny_model, script=False)
    assert scripted.scripted and not eager.scripted
    caches = KVCache(cfg, 2), KVCache(cfg, 2)
    tokens, pos = torch.tensor([3, 7]), torch.tensor([0, 2])
    for _ in range(4):
        a, b = scripted(tokens, caches[0], pos).logits, eager(tokens, caches[1], pos).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        tokens, pos = a.argmax(-1), pos + 1


@pytest.mark.parametrize("variant", [{}, {"bias": False}, {"residual": False, "n_layer": 1}])
def test_parameter_shapes_match_the_built_model(tiny_config: ModelConfig, variant) -> None:
    config = dataclasses.replace(tiny_config, **variant)
    built = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    assert parameter_shapes(config) == built
    assert list(parameter_shapes(config)) == list(built)  # same order too


def test_kv_cache_starts_zeroed_on_cpu(tiny_config: ModelConfig) -> None:
    cache = KVCache(tiny_config, 3, dtype=torch.bfloat16)
    assert cache.k.shape == (tiny_config.n_layer, 3, tiny_config.n_head, tiny_config.block_size, tiny_config.head_dim)
    assert cache.k.dtype == torch.bfloat16 and cache.v.dtype == torch.bfloat16
    assert not cache.k.any() and not cache.v.any()
    cache.k[0, 1].fill_(1.0)
    assert cache.k.sum() == cache.k[0, 1].numel() and not cache.v.any()  # separate storage


def _drive_with_others_between(model: Transformer, steps, other: torch.Tensor) -> tuple[object, int]:
    """Run `steps` (forward_steps) as a job is run: each step in its own inference context, another forward of
    `other` (a decode step's stand-in) between steps; (its result, how many times it yielded)."""

    def forward() -> None:
        with torch.inference_mode():
            model(other)

    return run_job(in_slices(steps, torch.inference_mode), forward)


@pytest.mark.parametrize("kind", ["plain", "resid_edits", "at", "patch", "cache"])
def test_forward_steps_equal_forward_bit_for_bit(tiny_model: Transformer, kind: str) -> None:
    """The block-at-a-time forward, other forwards run between its steps, equals `forward()` exactly and yields once
    per block."""
    from model.edits import SITES, StreamPatch

    cfg = tiny_model.config
    idx = _tokens(2, 7, seed=3)
    other = _tokens(1, 11, seed=4)  # another length: anything kept on the module between steps would show
    kw: dict[str, object] = {}
    if kind == "resid_edits":
        iv = Intervention(skip=((1, "attn"),), scale=((0, "mlp", 0.5),))
        kw = dict(return_resid=True, edits=iv.compile(cfg.n_layer).expand(2))
    elif kind == "at":
        kw = dict(return_resid=True, at=torch.tensor([6, 2]))
    elif kind == "patch":
        value = torch.randn(2, cfg.d_model, generator=torch.Generator().manual_seed(5))
        site = torch.tensor([SITES.index("resid_pre"), SITES.index("mlp_out")])
        kw = dict(patch=StreamPatch(torch.tensor([1, 0]), site, torch.tensor([3, 5]), value), last_only=True)
    caches = []
    if kind == "cache":  # a prefill then a decode step, each into its own copy of the same cache
        for _ in range(2):
            cache = KVCache(cfg, 2)
            with torch.inference_mode():
                tiny_model(idx, cache=cache, pos=torch.zeros(2, dtype=torch.long))
            caches.append(cache)
        step = _tokens(2, 1, seed=6)
        pos = torch.full((2,), 7)
        with torch.inference_mode():
            want = tiny_model(step, cache=caches[0], pos=pos, last_only=True, return_resid=True)
        got, yields = _drive_with_others_between(
            tiny_model,
            tiny_model.forward_steps(step, cache=caches[1], pos=pos, last_only=True, return_resid=True),
            other,
        )
        assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    else:
        with torch.inference_mode():
            want = tiny_model(idx, **kw)
        got, yields = _drive_with_others_between(tiny_model, tiny_model.forward_steps(idx, **kw), other)
    assert yields == cfg.n_layer
    assert torch.equal(got.logits, want.logits)
    assert (got.resid is None) == (want.resid is None)
    for layer_got, layer_want in zip(got.resid or [], want.resid or [], strict=True):
        for name in RESID_NAMES:
            assert torch.equal(layer_got[name], layer_want[name]), name
    if want.final is not None:
        assert torch.equal(got.final, want.final)
