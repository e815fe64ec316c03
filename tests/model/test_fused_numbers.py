"""Numbers pinned exactly (issue #30): a float16 KV cache holds each key and value rounded to nearest, ties to even
(what `x.to(torch.float16)` gives), on the reference path and in the fused C step (F16C); and the shipped model's
head width (32) through a prefill and the engine, on both decode steps.

The fused step's own tests (tests/model/test_fused_step.py) compare it with the reference within tolerances; here
the rounding itself is pinned with values halfway between float16 neighbours, so no tolerance can hide it."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from model.config import ModelConfig
from model.engine import Engine, SamplingParams
from model.fast import FusedDecoder, cpu_supported, fused_available, supports
from model.kv_cache import KVCache
from model.transformer import Transformer
from tests.conftest import build_model

# the shipped model's head width: d_model / n_head = 32
HD32 = ModelConfig(block_size=32, n_layer=2, n_head=2, d_model=64, d_ff=128)
NO_FUSED = "the fused step is not built here (make builds it)"

ULP = 2.0**-10  # float16's spacing in [1, 2)
# (float32 value, its float16 rounding to nearest, ties to even), worked out by hand
TIES = [
    (1 + ULP / 2, 1.0),  # halfway between 1 and 1 + ulp: to the even one, 1 (truncation agrees, rounding up does not)
    (1 + 3 * ULP / 2, 1 + 2 * ULP),  # halfway between 1 + ulp and 1 + 2 ulp: to even, up (truncation goes down)
    (1 + ULP / 2 + 2.0**-23, 1 + ULP),  # a float32 ulp past halfway: up (truncation goes down)
    (1 + ULP - 2.0**-23, 1 + ULP),  # just below a float16 value: up to it (truncation drops a whole ulp)
    (-(1 + 3 * ULP / 2), -(1 + 2 * ULP)),  # the sign does not change the magnitude's rounding
    (3 * 2.0**-25, 2.0**-23),  # subnormal float16: halfway between 2^-24 and 2^-23, to the even one
    (2.0**-25, 0.0),  # halfway between 0 and the smallest subnormal: to 0 (even)
    (1000 + 0.25, 1000.0),  # spacing 0.5 in [512, 1024): halfway, to even (1000)
    (1000 + 0.75, 1001.0),  # halfway again, to even (1001.0 is mantissa ...10, even): up
]


def crafted_values(n: int, seed: int) -> torch.Tensor:
    """n float32 values: every tie above, at several scales and signs, then random values."""
    vals: list[float] = []
    for scale in (1.0, 2.0**-4, 2.0**3):
        for x, _ in TIES[:5]:
            vals += [x * scale, -x * scale]
    vals += [x for x, _ in TIES[5:]]
    rand = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    out = torch.cat([torch.tensor(vals, dtype=torch.float32), rand])[:n]
    assert out.numel() == n
    return out


def test_the_ties_round_to_even_in_torch() -> None:
    """The expectation the caches are held to (`x.to(torch.float16)`) is itself round to nearest, ties to even."""
    for x, want in TIES:
        assert torch.tensor(x, dtype=torch.float32).item() == x  # exactly representable in float32
        assert torch.tensor(x, dtype=torch.float32).to(torch.float16).item() == want, x


def keyed_model(k: torch.Tensor, v: torch.Tensor) -> Transformer:
    """A head-width-32 model whose every key is `k` (d_model,) and every value `v`: zero QKV weights, biases k, v."""
    model = build_model(ModelConfig(**{**HD32.__dict__, "bias": True}), seed=11)
    C = model.config.d_model
    with torch.no_grad():
        for b in model.blocks:
            b.attn.c_attn.weight.zero_()
            b.attn.c_attn.bias[C : 2 * C] = k
            b.attn.c_attn.bias[2 * C :] = v
    return model


def expected_cache(x: torch.Tensor, cfg: ModelConfig, T: int) -> torch.Tensor:
    """(n_layer, n_head, T, head_dim): x (d_model,) as float16, at every layer and position."""
    per_head = x.to(torch.float16).view(cfg.n_head, 1, cfg.head_dim)
    return per_head.expand(cfg.n_layer, cfg.n_head, T, cfg.head_dim)


K, V = crafted_values(HD32.d_model, seed=1), crafted_values(HD32.d_model, seed=2)
TOKENS = torch.tensor([5, 200, 31, 77, 140, 9])


def assert_cache_holds(cache: KVCache, row: int, T: int, cfg: ModelConfig) -> None:
    assert cache.k.dtype == torch.float16
    # bitwise: equal as float16 bit patterns (no tolerance; +0 and -0 told apart too)
    got_k, got_v = cache.k[:, row, :, :T], cache.v[:, row, :, :T]
    assert torch.equal(got_k.view(torch.int16), expected_cache(K, cfg, T).view(torch.int16))
    assert torch.equal(got_v.view(torch.int16), expected_cache(V, cfg, T).view(torch.int16))


@torch.no_grad()
def test_reference_forward_writes_float16_keys_rounded_to_nearest_even() -> None:
    model = keyed_model(K, V)
    cache = KVCache(model.config, 1, dtype=torch.float16)
    T = TOKENS.numel()
    model(TOKENS[None], cache=cache, pos=torch.tensor([0]))
    assert_cache_holds(cache, 0, T, model.config)


@torch.no_grad()
@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_fused_step_and_prefill_write_float16_keys_rounded_to_nearest_even(weights: str) -> None:
    if not fused_available():
        pytest.skip(NO_FUSED)
    model = keyed_model(K, V)
    cfg = model.config
    dec = FusedDecoder(model, weights=weights)
    T = TOKENS.numel()
    prefilled = KVCache(cfg, 1, dtype=torch.float16)
    dec.prefill(TOKENS, prefilled)
    assert_cache_holds(prefilled, 0, T, cfg)
    stepped = KVCache(cfg, 3, dtype=torch.float16)
    for p in range(T):  # three rows, one token each per step
        dec(TOKENS[[p, (p + 1) % T, (p + 2) % T]], stepped, torch.full((3,), p))
    for row in range(3):
        assert_cache_holds(stepped, row, T, cfg)


# ---------------------------------------------------------------- head width 32: prefill and the engine


@pytest.fixture(scope="module")
def hd32_model() -> Transformer:
    model = build_model(HD32, seed=5)
    assert model.config.head_dim == 32
    return model


@torch.no_grad()
@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
def test_head_width_32_fused_prefill_matches_the_reference_forward(hd32_model: Transformer, kv: torch.dtype) -> None:
    if not fused_available():
        pytest.skip(NO_FUSED)
    cfg = hd32_model.config
    assert supports(cfg)
    dec = FusedDecoder(hd32_model, weights="float32")
    tokens = torch.randint(0, 256, (19,), generator=torch.Generator().manual_seed(0))  # 2 blocks of 8 and a tail
    got_cache, ref_cache = KVCache(cfg, 1, dtype=kv), KVCache(cfg, 1, dtype=kv)
    out = dec.prefill(tokens, got_cache, trace=True)
    ref = hd32_model(tokens[None], cache=ref_cache, pos=torch.tensor([0]), return_resid=True)
    tol = 1e-4 if kv == torch.float32 else 3e-3
    torch.testing.assert_close(out.logits, ref.logits[:, -1], atol=tol, rtol=0)
    assert ref.resid is not None and out.stream is not None
    want = torch.stack([ref.resid[0]["resid_pre"][:, -1]] + [r["resid_post"][:, -1] for r in ref.resid])
    torch.testing.assert_close(out.stream, want, atol=tol, rtol=1e-3)
    n = tokens.numel()
    torch.testing.assert_close(got_cache.k[:, :, :, :n], ref_cache.k[:, :, :, :n], atol=tol, rtol=1e-3)


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from a full float64 forward at every step."""
    ref = build_model(HD32, seed=5).double()
    idx, out, lps = list(prompt), [], []
    for _ in range(n):
        logp = torch.log_softmax(ref(torch.tensor([idx])).logits[0, -1], dim=-1)
        tok = int(logp.argmax())
        out.append(tok)
        lps.append(float(logp[tok]))
        idx.append(tok)
    return out, lps


@pytest.mark.parametrize("backend", ["torchscript", "fused"])
def test_head_width_32_engine_greedy_equals_a_full_forward(hd32_model: Transformer, backend: str) -> None:
    """Three prompts of different lengths in one batch (the prefill, then the decode step), greedy to the end of the
    window: tokens and logprobs of a full forward."""
    if backend == "fused" and not fused_available():
        pytest.skip(NO_FUSED)
    prompts = [[3, 141, 59], list(range(40, 51)), [200]]
    n = 12

    async def main() -> list[tuple[list[int], list[float]]]:
        engine = Engine(hd32_model, decode_weights="float32", decode_backend=backend)
        engine.start()
        try:
            params = SamplingParams(max_new_tokens=n, temperature=0.0, logprobs=1)
            handles = [engine.submit(p, params) for p in prompts]
            results = [await asyncio.wait_for(h.result(), timeout=30) for h in handles]
        finally:
            engine.stop()
        return [([t.token_id for t in toks], [t.logprob or 0.0 for t in toks]) for toks, _ in results]

    for prompt, (ids, lps) in zip(prompts, asyncio.run(main()), strict=True):
        want_ids, want_lps = greedy_reference(hd32_model, prompt, n)
        assert ids == want_ids
        assert lps == pytest.approx(want_lps, abs=1e-4)


def test_fused_step_runs_where_ci_requires_it() -> None:
    """TEST_REQUIRE_FUSED=1 (CI, on a CPU with AVX2, FMA and F16C): the fused step is built and loads here."""
    if os.environ.get("TEST_REQUIRE_FUSED") != "1":
        pytest.skip("TEST_REQUIRE_FUSED is not set")
    assert cpu_supported("avx2"), "TEST_REQUIRE_FUSED=1 on a CPU without AVX2/FMA/F16C"
    assert fused_available(), NO_FUSED
