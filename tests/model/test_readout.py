"""model.readout: hidden states equal an independent forward read with module hooks; activation patching equals a
naive loop that patches one activation per forward with hooks, and meets the known identities."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from model.edits import Intervention, StreamPatch
from model.readout import hidden_states, patching, resolve_positions, to_safetensors
from model.transformer import RESID_NAMES, Transformer
from tests.helpers import run_job


def run(gen: Generator[None, None, Any]) -> Any:
    return run_job(gen)[0]


def hooked_acts(model: Transformer, ids: list[int]) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """Every site of every layer (T, C) and the logits (T, V), read with module hooks (not return_resid)."""
    acts: dict[str, list[torch.Tensor]] = {s: [] for s in RESID_NAMES}
    handles = []
    for block in model.layers:
        handles.append(block.register_forward_pre_hook(lambda m, a: acts["resid_pre"].append(a[0][0].clone())))
        handles.append(block.attn.register_forward_hook(lambda m, a, o: acts["attn_out"].append(o[0].clone())))
        handles.append(block.mlp.register_forward_hook(lambda m, a, o: acts["mlp_out"].append(o[0].clone())))
        handles.append(block.register_forward_hook(lambda m, a, o: acts["resid_post"].append(o[0].clone())))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
    finally:
        for h in handles:
            h.remove()
    acts["resid_mid"] = [pre + a for pre, a in zip(acts["resid_pre"], acts["attn_out"], strict=True)]
    return acts, logits


def hooked_patch(
    model: Transformer, ids: list[int], layer: int, site: str, pos: int, value: torch.Tensor
) -> torch.Tensor:
    """Last-position logits (V,) of `ids` with one activation replaced, by a hook on the module that makes it."""
    block = model.layers[layer]

    def put(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[0, pos] = value
        return t

    if site == "resid_pre":
        h = block.register_forward_pre_hook(lambda m, a: (put(a[0]), *a[1:]))
    elif site == "attn_out":
        h = block.attn.register_forward_hook(lambda m, a, o: put(o))
    elif site == "mlp_out":
        h = block.mlp.register_forward_hook(lambda m, a, o: put(o))
    else:
        h = block.register_forward_hook(lambda m, a, o: put(o))
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1]
    finally:
        h.remove()


def test_hidden_states_equal_a_hooked_forward(make_model: Callable[..., Transformer]) -> None:
    model = make_model()
    prompts = [[5, 9, 200, 3, 7], [1, 2, 3]]
    layers, sites = [2, 0], list(RESID_NAMES)
    positions = [resolve_positions("all", 5), resolve_positions([-1, 0], 3)]
    got = run(hidden_states(model, prompts, layers, sites, positions))
    assert [g.shape for g in got] == [(2, 5, 5, 32), (2, 5, 2, 32)]
    for ids, pos, arr in zip(prompts, positions, got, strict=True):
        acts, _ = hooked_acts(model, ids)
        for li, layer in enumerate(layers):
            for si, site in enumerate(sites):
                torch.testing.assert_close(arr[li, si], acts[site][layer][pos], atol=1e-5, rtol=1e-5)


def test_hidden_states_carry_the_intervention(make_model: Callable[..., Transformer]) -> None:
    model = make_model()
    ids = [4, 8, 15, 16, 23]
    iv = Intervention(skip=((1, "attn"),))
    [arr] = run(hidden_states(model, [ids], [1], ["resid_pre", "attn_out", "resid_mid"], [list(range(5))], iv))
    assert torch.count_nonzero(arr[0, 1]) == 0  # a skipped part writes nothing
    torch.testing.assert_close(arr[0, 2], arr[0, 0])  # and the stream passes it unchanged


def run_between(model: Transformer, gen: Generator[None, None, Any]) -> tuple[Any, int]:
    """Run a job as the engine does, a forward of another prompt (a decode step's stand-in) between its slices, each
    slice outside any grad/inference context: (its result, how many slices it yielded)."""
    other = torch.tensor([[7, 1, 99, 42, 3, 3, 250]])

    def forward() -> None:
        with torch.inference_mode():
            model(other)

    return run_job(gen, forward)


@pytest.mark.parametrize("with_intervention", [False, True])
def test_an_export_is_sliced_per_block_and_equals_the_whole_forward(
    make_model: Callable[..., Transformer], with_intervention: bool
) -> None:
    """An export yields at least once per block of each prompt's forward (a job slice is one block, not a forward),
    and its arrays equal the activations of one whole reference forward, bit for bit, other forwards run between."""
    model = make_model()
    n_layer = model.config.n_layer
    prompts = [[5, 9, 200, 3, 7], [1, 2, 3]]
    layers, sites = list(range(n_layer)), list(RESID_NAMES)
    positions = [resolve_positions("all", len(ids)) for ids in prompts]
    iv = Intervention(skip=((1, "attn"),), scale=((0, "mlp", 0.5),)) if with_intervention else None
    got, slices = run_between(model, hidden_states(model, prompts, layers, sites, positions, iv))
    assert slices >= n_layer * len(prompts)
    for ids, arr in zip(prompts, got, strict=True):
        edits = iv.compile(n_layer, n_prompt=len(ids)) if iv else None
        with torch.inference_mode():
            whole = model(torch.tensor([ids]), return_resid=True, edits=edits)
        assert whole.resid is not None
        want = torch.stack([torch.stack([whole.resid[layer][site][0] for site in sites]) for layer in layers])
        assert arr.dtype == torch.float32 and torch.equal(arr, want)


def test_positions_resolve_and_refuse() -> None:
    assert resolve_positions("last", 4) == [3]
    assert resolve_positions([0, -1, -4], 4) == [0, 3, 0]
    with pytest.raises(ValueError, match=r"positions\[1\] is 4"):
        resolve_positions([0, 4], 4)


def test_safetensors_names_like_transformer_lens() -> None:
    from safetensors.torch import load

    arrays = [torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)]
    data = to_safetensors(arrays, [5, 1], ["resid_pre", "attn_out", "resid_post"], {"token_ids": [[1], [2]]})
    loaded = load(data)
    assert sorted(loaded) == sorted(
        f"blocks.{l}.hook_{s}" for l in (5, 1) for s in ("resid_pre", "attn_out", "resid_post")
    )
    torch.testing.assert_close(loaded["blocks.1.hook_attn_out"], torch.stack([a[1, 1] for a in arrays]))
    with pytest.raises(ValueError, match="same number of positions"):
        to_safetensors([torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 3, 8)], [0], ["resid_pre"], {})


@pytest.mark.parametrize("metric", ["logprob", "logit_diff"])
def test_batched_patching_equals_a_naive_hooked_loop(make_model: Callable[..., Transformer], metric: str) -> None:
    model = make_model()
    clean, corrupt = [10, 20, 30, 40, 50, 60], [10, 21, 30, 41, 50, 60]
    sites = ("resid_pre", "attn_out", "mlp_out", "resid_post")
    target, contrast = 7, (9 if metric == "logit_diff" else None)
    # 5 rows per forward: chunks that cut across layers and sites; other forwards between its slices, as in a server
    res, slices = run_between(
        model,
        patching(
            model, clean, corrupt, target=target, metric=metric, contrast=contrast, sites=sites, tokens_per_forward=30
        ),
    )
    clean_acts, clean_logits = hooked_acts(model, clean)
    _, corrupt_logits = hooked_acts(model, corrupt)

    def m(logits: torch.Tensor) -> float:
        x = logits.double()
        return float(F.log_softmax(x, -1)[target]) if metric == "logprob" else float(x[target] - x[contrast])

    c, k = m(clean_logits[-1]), m(corrupt_logits[-1])
    assert res.clean_metric == pytest.approx(c, abs=1e-5) and res.corrupt_metric == pytest.approx(k, abs=1e-5)
    assert res.effect is not None
    for site in sites:
        for layer in range(model.config.n_layer):
            for pos in range(len(clean)):
                want = m(hooked_patch(model, corrupt, layer, site, pos, clean_acts[site][layer][pos]))
                assert res.raw[site][layer][pos] == pytest.approx(want, abs=1e-4), (site, layer, pos)
                assert res.effect[site][layer][pos] == pytest.approx((want - k) / (c - k), abs=1e-3)
    assert res.forwards == 1 + -(-3 * 6 * 4 // 5)
    assert slices >= res.forwards * model.config.n_layer  # a slice per block of each forward


def test_patching_identities(make_model: Callable[..., Transformer]) -> None:
    model = make_model()
    clean, corrupt = [3, 1, 4, 1, 5, 9, 2], [3, 1, 4, 7, 5, 9, 2]  # one token differs, at position 3
    res = run(patching(model, clean, corrupt, sites=("resid_pre", "resid_post")))
    assert res.effect is not None
    pre0 = res.effect["resid_pre"][0]
    assert pre0[3] == pytest.approx(1.0, abs=1e-5)
    assert all(pre0[p] == pytest.approx(0.0, abs=1e-5) for p in range(7) if p != 3)
    assert res.effect["resid_post"][-1][-1] == pytest.approx(1.0, abs=1e-5)
    _, logits = hooked_acts(model, clean)
    assert res.target == int(logits[-1].argmax())  # null target: the clean run's greedy next token


def test_patching_refuses(make_model: Callable[..., Transformer]) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="clean is 3 tokens and corrupt is 2"):
        run(patching(model, [1, 2, 3], [1, 2]))
    with pytest.raises(ValueError, match="contrast"):
        run(patching(model, [1, 2], [1, 3], metric="logit_diff", target=1))
    with pytest.raises(ValueError, match="resid_mid"):
        run(patching(model, [1, 2], [1, 3], sites=("resid_mid",)))


def test_a_patch_row_without_a_layer_changes_nothing(make_model: Callable[..., Transformer]) -> None:
    model = make_model()
    idx = torch.tensor([[1, 2, 3, 4]] * 2)
    patch = StreamPatch(torch.tensor([-1, 1]), torch.tensor([4, 4]), torch.tensor([3, 3]), torch.zeros(2, 32))
    with torch.no_grad():
        plain = model(idx).logits
        patched = model(idx, patch=patch).logits
    torch.testing.assert_close(patched[0], plain[0])
    assert not torch.allclose(patched[1, 3], plain[1, 3])
    torch.testing.assert_close(patched[1, :3], plain[1, :3])  # causal: earlier positions unchanged
    with pytest.raises(ValueError, match="patch's layer"):
        model(idx, patch=patch._replace(layer=torch.tensor([5, 0])))
