"""The int8 VNNI kernels of the fused step (vpdpbusd; fused_step.c): activations as the bytes xq + 128, weights
packed as quads with each column's 128 * sum subtracted after the sums, so the same int32 sums as the AVX2 kernels
(vpmaddwd on pairs) and bitwise the same logits, stream and cache, at every tile shape (6, 4 and 1 rows, 64 and 16
columns), on 1 and 2 threads (rows split, or columns and heads split), in the step and in the prefill.

The machine this was written on has no VNNI, nor does its QEMU run it: there the kernels run in the test build
`avx2-vnni-emulated` (model/fast/build.py), the same source with vpdpbusd replaced by a scalar loop that is its
definition, itself checked against integer maths in numpy. Every test also runs on the real instruction (the AVX-512
build) and skips that case only where the CPU lacks AVX512_VNNI: on such a machine,
`pytest tests/model/test_fused_vnni.py` is the check of the real kernels."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.fast import FusedDecoder, build, cpu_supported
from model.fast.decoder import pack_int8_pairs, pack_int8_quads, quantize_int8
from model.fast.loader import _cpu_flags, int8_layout, load
from model.kv_cache import KVCache
from tests.conftest import TINY, build_model
from tests.model.test_fused_threads import _edits, _run_steps

CONFIGS = {
    # K = 64 and 192, N = 192, 64, 192: the 1-row kernel's 64-column path; heads split one at a time
    "wide": ModelConfig(**{**TINY, "d_model": 64, "d_ff": 192, "n_head": 4}),
    # K = 80 and 208, N = 240, 80, 208: 16-column tails after the 64-column path; no bias, a plain stack
    "odd": ModelConfig(**{**TINY, "d_model": 80, "d_ff": 208, "n_head": 2, "bias": False, "residual": False}),
}


@pytest.fixture(scope="module")
def avx2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AVX2 build: int8 through vpmaddwd on pairs, the reference here."""
    if not cpu_supported("avx2"):
        pytest.skip("this CPU cannot run the avx2 build")
    out = build(tmp_path_factory.mktemp("vnni") / "avx2.so")
    if out is None:
        pytest.skip("no C compiler")
    return out


@pytest.fixture(scope="module", params=["emulated", "avx512_vnni"])
def vnni(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A library whose int8 layout is quads: the emulated test build, and the AVX-512 build on a CPU with VNNI."""
    folder = tmp_path_factory.mktemp("vnni")
    if request.param == "emulated":
        if not cpu_supported("avx2"):
            pytest.skip("this CPU cannot run the avx2 build")
        out = build(folder / "emulated.so", isa="avx2-vnni-emulated")
    else:
        if not (cpu_supported("avx512") and "avx512_vnni" in _cpu_flags()):
            pytest.skip("this CPU has no AVX512_VNNI: the VNNI kernels ran through the emulated build only")
        out = build(folder / "avx512.so", isa="avx512")
    if out is None:
        pytest.skip("no C compiler")
    lib = load(str(out))
    assert lib is not None and int8_layout(lib) == "quads"  # the library runs its VNNI kernels here
    return out


def _dpbusd(lib: ctypes.CDLL, acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[int, np.ndarray]:
    fn = lib.shortcut_fused_dpbusd
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    out = np.zeros_like(acc)
    rc = fn(len(acc), acc.ctypes.data, a.ctypes.data, b.ctypes.data, out.ctypes.data)
    return rc, out


def test_the_kernels_vpdpbusd_is_its_definition_in_integer_maths(vnni: Path, avx2: Path) -> None:
    """Per 32-bit lane: acc + the four products of unsigned a and signed b, wrapping at 32 bits, not saturating (as
    the pairs of vpmaddubsw would), at the extremes (0/255 against -128/127) and on random bytes; the AVX2 build has
    no VNNI kernel and says so."""
    gen = np.random.default_rng(7)
    n = 8 * 40
    a = gen.integers(0, 256, 4 * n, dtype=np.uint8)
    b = gen.integers(-128, 128, 4 * n, dtype=np.int8)
    acc = gen.integers(-(2**30), 2**30, n, dtype=np.int32)
    a[:32], b[:32] = 255, -128  # lanes 0-7: four times -32640, beyond int16
    a[32:64], b[32:64] = 255, 127
    a[64:96], b[64:96] = 0, -128
    a[96:128], b[96:128] = np.tile([0, 255], 16), np.tile([127, -128], 16)
    acc[:8] = [0, -1, 2**31 - 1, -(2**31), 5, 2**31 - 130560, -(2**31) + 130559, 1]  # lanes 3, 6: wrap
    acc[8:16] = 2**31 - 1  # 4 * 255 * 127 more: wraps past the top
    lib = load(str(vnni))
    assert lib is not None
    rc, got = _dpbusd(lib, acc, a, b)
    assert rc == 0
    products = (a.astype(np.int64) * b.astype(np.int64)).reshape(n, 4).sum(1)
    want = ((acc.astype(np.int64) + products + 2**31) % 2**32 - 2**31).astype(np.int32)
    np.testing.assert_array_equal(got, want)
    assert (products[:8] == 4 * 255 * -128).all() and (got[8:16] < 0).all()  # no int16 saturation; int32 wraps
    plain = load(str(avx2))
    assert plain is not None and _dpbusd(plain, acc, a, b)[0] == -1 and int8_layout(plain) == "pairs"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B", [1, 2, 7, 32])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_vnni_step_is_bitwise_the_avx2_int8_step(vnni: Path, avx2: Path, config: str, B: int, threads: int) -> None:
    """Three edited steps of B rows at scattered positions from a random float16 cache, every other row traced:
    logits, stream and cache equal bit for bit (batch 7: tiles of 6 and 1 rows, on 2 threads 3 and 4; batch 32: 6s
    and 1s, on 2 threads 6s and 4s; batch 1 on 2 threads: columns split into 16-column shares)."""
    model = build_model(CONFIGS[config], seed=11)
    quads = FusedDecoder(model, weights="int8", library=vnni, threads=threads)
    pairs = FusedDecoder(model, weights="int8", library=avx2, threads=threads)
    assert (quads.int8_layout, pairs.int8_layout) == ("quads", "pairs")
    assert quads.threads == pairs.threads == threads
    got, want = _run_steps(quads, B, torch.float16, seed=B), _run_steps(pairs, B, torch.float16, seed=B)
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(x, y), i


@pytest.mark.parametrize("threads", [1, 2])
def test_the_vnni_prefill_is_bitwise_the_avx2_int8_prefill(vnni: Path, avx2: Path, threads: int) -> None:
    """A whole window's prompt with edits (rows sharing one cache row; on 2 threads columns and heads split), then a
    chunk from position 20: every position's logits, the trace and the cache equal bit for bit."""
    model = build_model(CONFIGS["odd"], seed=4)
    cfg = model.config
    seq = torch.randint(0, 256, (cfg.block_size,), generator=torch.Generator().manual_seed(2))
    edits = _edits(cfg, 1, torch.Generator().manual_seed(5))
    outs = []
    for lib in (vnni, avx2):
        dec = FusedDecoder(model, weights="int8", library=lib, threads=threads)
        cache = KVCache(cfg, 1)
        out = dec.prefill(seq, cache, edits, trace=True, all_logits=True)
        again = dec.prefill(seq[20:], cache, edits, trace=True, all_logits=True, start=20)
        outs.append((out.logits, out.stream, again.logits, again.stream, cache.k, cache.v))
    for x, y in zip(*outs, strict=True):
        assert torch.equal(x, y)


def test_quads_hold_the_weights_and_their_column_sums(vnni: Path) -> None:
    """Read back through the layer's pointers: each matrix as (in / 4, out, 4) quads is the int8 matrix (an
    independent unpacking, and the pairs of the same matrix), and z is 128 times each column's sum."""
    model = build_model(CONFIGS["odd"], seed=4)
    dec = FusedDecoder(model, weights="int8", library=vnni)
    for block, layer in zip(model.blocks, dec._layers, strict=True):
        for name, zname, lin in (
            ("w_qkv", "z_qkv", block.attn.c_attn),
            ("w_o", "z_o", block.attn.c_proj),
            ("w_fc", "z_fc", block.mlp.c_fc),
            ("w_p", "z_p", block.mlp.c_proj),
        ):
            q, _ = quantize_int8(lin.weight.detach().float().t())
            k, n = q.shape
            raw = np.frombuffer(ctypes.string_at(getattr(layer, name), k * n), dtype=np.int8).reshape(k // 4, n, 4)
            unpacked = np.stack([raw[:, :, j] for j in range(4)], axis=1).reshape(k, n)  # rows 4i, 4i+1, 4i+2, 4i+3
            np.testing.assert_array_equal(unpacked, q.numpy())
            z = np.frombuffer(ctypes.string_at(getattr(layer, zname), 4 * n), dtype=np.int32)
            np.testing.assert_array_equal(z, 128 * q.numpy().astype(np.int64).sum(0))
            pairs = pack_int8_pairs(q).numpy()
            np.testing.assert_array_equal(pairs.reshape(k // 4, 2, n, 2)[:, 0], raw[:, :, :2])
    assert pack_int8_quads(torch.ones(4, 16, dtype=torch.int8))[1].dtype == torch.int32


def test_a_layout_the_library_cannot_run_is_refused(vnni: Path, avx2: Path) -> None:
    """Quads only where the library runs them (a ValueError naming the choice; C refuses them too, with nothing
    written); the VNNI library also runs pairs, the same bits."""
    model = build_model(CONFIGS["wide"], seed=1)
    cfg = model.config
    with pytest.raises(ValueError, match="int8_layout must be 'pairs' or this library's 'pairs'"):
        FusedDecoder(model, weights="int8", library=avx2, int8_layout="quads")
    with pytest.raises(ValueError, match="int8_layout"):
        FusedDecoder(model, weights="int8", library=vnni, int8_layout="triples")
    dec = FusedDecoder(model, weights="int8", library=avx2)
    dec._dims.int8_layout = 1  # quads, behind the packer's back
    cache = KVCache(cfg, 2)
    with pytest.raises(ValueError, match="layout this library cannot run"):
        dec(torch.tensor([1, 2]), cache, torch.tensor([0, 3]))
    assert not cache.k.any()
    tokens, pos = torch.tensor([1, 2, 3]), torch.tensor([0, 3, 5])
    outs = [
        FusedDecoder(model, weights="int8", library=lib, int8_layout=layout)(tokens, KVCache(cfg, 3), pos).logits
        for lib, layout in ((vnni, "pairs"), (vnni, None), (avx2, None))
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_the_emulated_build_is_test_only(tmp_path: Path) -> None:
    """Never built next to the source nor loaded by default: it needs an explicit path; without a working compiler
    it is not built, as the others."""
    from model.fast.abi import LIBRARIES

    assert "avx2-vnni-emulated" not in LIBRARIES
    with pytest.raises(ValueError, match="explicit `out`"):
        build(isa="avx2-vnni-emulated")
    assert build(tmp_path / "x.so", compiler="false", isa="avx2-vnni-emulated") is None
