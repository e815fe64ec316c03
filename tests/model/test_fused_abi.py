"""The fused step's C boundary (model/fast/fused_step.h, mirrored in model/fast/abi.py): the ctypes mirrors lay the
structs out as the compiler does, the ABI versions agree, a stale library is refused (the TorchScript step runs),
the weights' named pointers point where the packing put each parameter, and edits reach C through one function."""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from model.decode import FastDecoder
from model.edits import StreamEdits
from model.fast import FusedDecoder, abi, build, cpu_supported, fused_available, make_decoder
from model.fast.decoder import LAYER_MATRICES, LAYER_SCALES, LAYER_SUMS, LAYER_VECTORS
from model.fast.loader import layout, load
from tests.conftest import build_model


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not cpu_supported("avx2"):
        pytest.skip("this CPU cannot run the avx2 build")
    out = build(tmp_path_factory.mktemp("abi") / "fused.so")
    if out is None:
        pytest.skip("no C compiler")
    return out


def test_the_ctypes_mirrors_lay_the_structs_out_as_the_compiler_does(library: Path) -> None:
    lib = load(str(library))
    assert lib is not None
    c_layout = layout(lib)
    py_layout: dict[str, tuple[int, int]] = {}
    for struct in abi.STRUCTS:
        py_layout[struct.__name__] = (0, ctypes.sizeof(struct))
        for name, ctype in struct._fields_:
            py_layout[f"{struct.__name__}.{name}"] = (getattr(struct, name).offset, ctypes.sizeof(ctype))
    assert py_layout == c_layout  # every struct and field on both sides, at the same offset with the same size
    assert {name.split(".")[0] for name in c_layout} == {s.__name__ for s in abi.STRUCTS}


def test_the_abi_version_is_the_headers_and_the_librarys(library: Path) -> None:
    lib = load(str(library))
    assert lib is not None
    assert abi.ABI_VERSION == abi.header_abi_version() == lib.shortcut_fused_abi_version()


def _stale_builds(tmp_path: Path) -> dict[str, Path]:
    """A build from another ABI version, and a library from before the ABI version existed (no such symbol)."""
    if not cpu_supported("avx2"):
        pytest.skip("this CPU cannot run the avx2 build")
    other = build(tmp_path / "other_abi.so", cflags=[f"-DSHORTCUT_FUSED_ABI_VERSION={abi.ABI_VERSION + 7}"])
    cc = shutil.which("cc") or shutil.which("gcc")
    if other is None or cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "old.c"
    src.write_text(
        'const char *shortcut_fused_isa(void) { return "avx2"; }\nint shortcut_fused_step(void) { return 0; }\n'
    )
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(tmp_path / "old.so")], check=True)
    return {f"ABI {abi.ABI_VERSION + 7}": other, "ABI none": tmp_path / "old.so"}


def test_a_stale_library_is_refused_with_one_warning_and_torchscript_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_model(seed=0)
    for what, path in _stale_builds(tmp_path).items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="model.fast.loader"):
            assert not fused_available(path)
            assert not fused_available(path)  # asked again: refused again, without a second warning
            dec = make_decoder(model, "float16", "auto", library=path)
        assert isinstance(dec, FastDecoder) and dec.scripted
        stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
        assert stale == [
            f"fused decode step library {path} is stale ({what}, need {abi.ABI_VERSION}): "
            "rebuild with `python -m model.fast.build`; using the TorchScript step"
        ]
        with pytest.raises(RuntimeError, match="stale"):
            make_decoder(model, "float16", "fused", library=path)


def test_each_layers_named_pointers_point_at_its_parameters(library: Path) -> None:
    """The packing decides where each parameter lies; C follows the pointers: read them back through the pointers."""
    model = build_model(seed=4)
    cfg = model.config
    for weights, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        dec = FusedDecoder(model, weights=weights, library=library)
        assert len(dec._layers) == cfg.n_layer
        for block, layer in zip(model.blocks, dec._layers, strict=True):
            want = {
                "w_qkv": block.attn.c_attn.weight.t(),
                "w_o": block.attn.c_proj.weight.t(),
                "w_fc": block.mlp.c_fc.weight.t(),
                "w_p": block.mlp.c_proj.weight.t(),
                "ln_1_w": block.ln_1.weight,
                "ln_1_b": block.ln_1.bias,
                "b_qkv": block.attn.c_attn.bias,
                "b_o": block.attn.c_proj.bias,
                "ln_2_w": block.ln_2.weight,
                "ln_2_b": block.ln_2.bias,
                "b_fc": block.mlp.c_fc.bias,
                "b_p": block.mlp.c_proj.bias,
            }
            fields = {n for n, _ in abi.ShortcutLayerWeights._fields_}
            nulls = LAYER_SCALES + LAYER_SUMS
            assert set(want) | set(nulls) == set(LAYER_MATRICES + LAYER_VECTORS + nulls) == fields
            assert all(getattr(layer, s) is None for s in nulls)  # float weights: no scales nor sums (NULL)
            for name, param in want.items():
                t = param.detach().float().contiguous().to(dtype if name in LAYER_MATRICES else torch.float32)
                raw = ctypes.string_at(getattr(layer, name), t.numel() * t.element_size())
                assert raw == t.numpy().tobytes(), (weights, name)


def test_int8_matrices_and_their_scales_are_where_the_pointers_say(library: Path) -> None:
    """int8: each matrix read back through its pointer as (in / 2, out, 2) pairs and its scales through theirs give
    the parameter back to within half a step of its column's scale (an independent unpacking)."""
    model = build_model(seed=4)
    dec = FusedDecoder(model, weights="int8", library=library)
    assert dec.int8_layout == "pairs"  # (quads: tests/model/test_fused_vnni.py)
    for block, layer in zip(model.blocks, dec._layers, strict=True):
        assert all(getattr(layer, z) is None for z in LAYER_SUMS)
        for name, sname, lin in (
            ("w_qkv", "s_qkv", block.attn.c_attn),
            ("w_o", "s_o", block.attn.c_proj),
            ("w_fc", "s_fc", block.mlp.c_fc),
            ("w_p", "s_p", block.mlp.c_proj),
        ):
            w = lin.weight.detach().float().t()  # (in, out)
            k, n = w.shape
            raw = ctypes.string_at(getattr(layer, name), k * n)
            pairs = torch.frombuffer(bytearray(raw), dtype=torch.int8).view(k // 2, n, 2)
            q = torch.stack([pairs[:, :, 0], pairs[:, :, 1]], dim=1).reshape(k, n).float()  # row 2i, then 2i + 1
            scale = torch.frombuffer(bytearray(ctypes.string_at(getattr(layer, sname), 4 * n)), dtype=torch.float32)
            assert q.abs().max() <= 127
            torch.testing.assert_close(scale, w.abs().amax(0) / 127)
            assert ((q * scale - w).abs() <= scale / 2 + 1e-7).all(), name


def test_edits_reach_c_through_one_function() -> None:
    assert abi.edits_struct(None)[0].gates is None
    assert abi.edits_struct(StreamEdits(None))[0].gates is None
    gates = torch.rand(2, 3, 2, dtype=torch.float64).transpose(0, 1)  # (3, 2, 2), neither float32 nor contiguous
    c, alive = abi.edits_struct(StreamEdits(gates))
    (held,) = alive
    assert held.dtype == torch.float32 and held.is_contiguous() and c.gates == held.data_ptr()
    assert ctypes.string_at(c.gates, held.numel() * 4) == gates.float().contiguous().numpy().tobytes()
