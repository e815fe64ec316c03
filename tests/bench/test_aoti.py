"""The AOTInductor peer's exported step computes our decode step (checked eagerly: compiling takes too long here)."""

from __future__ import annotations

import torch

from bench.aoti import AotiDecoder, ExportStep
from model.decode import FastDecoder
from model.kv_cache import KVCache
from tests.conftest import build_model


def test_export_step_with_its_cache_writes_equals_our_step() -> None:
    model = build_model(seed=3)
    cfg = model.config
    step = ExportStep(model).eval()
    dec = AotiDecoder.__new__(AotiDecoder)  # the package's runner replaced by the module it was compiled from
    dec.runner = step
    ref = FastDecoder(model, weights="float32")
    tok, pos = torch.tensor([3, 9, 250]), torch.tensor([0, 4, 11])
    ours, theirs = KVCache(cfg, 3), KVCache(cfg, 3)
    for c in (ours, theirs):  # stale values past each row's position must not leak in
        c.k.normal_(generator=torch.Generator().manual_seed(0))
        c.v.normal_(generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for i in range(cfg.block_size - 12):
            got, want = dec(tok, theirs, pos + i).logits, ref(tok, ours, pos + i).logits
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            tok = want.argmax(-1)
    torch.testing.assert_close(theirs.k, ours.k, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.v, ours.v, atol=1e-5, rtol=0)
