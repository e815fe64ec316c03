"""Steering vectors (`intervention.add`): compiled per row, added after block L at the prompt's or the generated
positions; the reference forward equals a forward written out here, the TorchScript and fused steps equal the
reference, a steered row leaves its neighbours alone, the trace and diagnostics see the vector, and with the
shipped model a vector made from upper- vs lower-case lines makes greedy text upper case."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import tokenizer
from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.decode import FastDecoder, float16_weights_available
from model.diagnostics import DiagnosticsOptions, run_diagnostics
from model.edits import KINDS, MAX_COEFF, PARTS, Intervention, StreamEdits, VectorAdd
from model.engine import Engine, SamplingParams
from model.fast import FusedDecoder, fused_available
from model.kv_cache import KVCache
from model.transformer import Transformer
from tests.conftest import TINY, build_model
from tests.model.test_engine import events_of, ids, run_with_engine

C, L = TINY["d_model"], TINY["n_layer"]
PROMPT = tokenizer.encode("Residual")  # 8 tokens
CHECKPOINT = Path(__file__).resolve().parents[2] / "model" / "checkpoints" / "shakespeare.safetensors"


def vec(seed: int, scale: float = 1.0, d: int = C) -> torch.Tensor:
    return scale * torch.randn(d, generator=torch.Generator().manual_seed(seed))


def add(layer: int, seed: int, coeff: float = 1.0, positions: str = "all", scale: float = 1.0) -> VectorAdd:
    return VectorAdd.of(layer, vec(seed, scale), coeff, positions)


STEER = Intervention(add=(add(1, 0, 2.0),))  # every position
STEER_GEN = Intervention(skip=((1, "mlp"),), add=(add(0, 1, 1.5, "generated"), add(2, 2, -1.0, "prompt")))
STEER_PROMPT = Intervention(scale=((0, "attn", 0.5),), add=(add(1, 3, 1.0, "prompt"), add(1, 4, 0.5)))


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(ModelConfig(**TINY), seed=0)


# ---- the spec and its compiled form


def test_compile_puts_each_vector_at_its_layer_and_positions() -> None:
    a, b = vec(0), vec(1)
    iv = Intervention(
        add=(VectorAdd.of(2, a, 2.0, "prompt"), VectorAdd.of(2, b, -1.0), VectorAdd.of(0, b, 1, "generated"))
    )
    e = iv.compile(L, n_prompt=7)
    assert e.gates is None  # only adds: no gates to multiply
    assert e.add.shape == (1, L, 2, C) and e.n_prompt.tolist() == [7]
    torch.testing.assert_close(e.add[0, 2, 0], 2 * a - b, rtol=0, atol=0)
    torch.testing.assert_close(e.add[0, 2, 1], -b, rtol=0, atol=0)
    torch.testing.assert_close(e.add[0, 0, 1], b, rtol=0, atol=0)
    assert not e.add[0, 0, 0].any() and not e.add[0, 1].any()
    assert Intervention(add=(add(0, 0),)).compile(L).n_prompt.tolist() == [2**62]  # no n_prompt: all prompt
    assert Intervention(skip=((0, "mlp"),)).compile(L).add is None  # no adds: nothing to add, as before
    assert iv.parts() == {"add"} and STEER_GEN.parts() == {"mlp", "add"} and STEER_GEN.layers() == {0, 1, 2}
    assert "add" in KINDS and "add" not in PARTS


def test_stack_expand_combine_check_and_to() -> None:
    steer, gates = STEER.compile(L, n_prompt=3), Intervention(skip=((0, "block"),)).compile(L)
    s = StreamEdits.stack([None, steer, gates])
    assert s.gates.shape == (3, L, 2) and s.add.shape == (3, L, 2, C) and s.n_prompt.tolist() == [0, 3, 0]
    assert s.gates[1].eq(1).all() and s.gates[2, 0].eq(0).all()  # a row without gates gets the identity
    assert not s.add[0].any() and not s.add[2].any() and torch.equal(s.add[1], steer.add[0])  # and without adds zeros
    assert StreamEdits.stack([None, gates]).add is None and StreamEdits.stack([None, None]) is None
    s.check(3, L, C)
    with pytest.raises(ValueError, match="add"):
        s.check(3, L, C + 1)
    with pytest.raises(ValueError, match="together"):
        StreamEdits(None, s.add, None).check(3, L)
    x = steer.expand(4)
    assert x.add.shape == (4, L, 2, C) and x.n_prompt.tolist() == [3] * 4 and x.gates is None
    both = gates.combine(steer)
    assert torch.equal(both.gates, gates.gates) and torch.equal(both.add, steer.add)
    twice = steer.combine(steer)
    torch.testing.assert_close(twice.add, 2 * steer.add)
    with pytest.raises(ValueError, match="prompt lengths"):
        steer.combine(STEER.compile(L, n_prompt=4))
    moved = s.to("cpu")
    assert all(torch.equal(p, q) for p, q in zip(moved, s, strict=True))


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (VectorAdd.of(3, vec(0)), "intervention.add[1].layer"),
        (VectorAdd.of(-1, vec(0)), "intervention.add[1].layer"),
        (VectorAdd.of(0, vec(0, d=C + 1)), "intervention.add[1].vector"),
        (VectorAdd.of(0, torch.full((C,), float("nan"))), "intervention.add[1].vector"),
        (VectorAdd.of(0, [1e39] * C), "intervention.add[1].vector"),  # not finite as float32
        (VectorAdd.of(0, vec(0), float("inf")), "intervention.add[1].coeff"),
        (VectorAdd.of(0, vec(0), MAX_COEFF * 1.01), "intervention.add[1].coeff"),
        (VectorAdd.of(0, vec(0), 1.0, "decode"), "intervention.add[1].positions"),
    ],
)
def test_problems_name_the_add_entry(entry: VectorAdd, field: str) -> None:
    problem = Intervention(add=(add(0, 1), entry)).problem(L, C)
    assert problem is not None and problem[0] == field, problem
    assert Intervention(add=(add(2, 0, -MAX_COEFF, "generated"),)).problem(L, C) is None
    not_a_part = Intervention(skip=((0, "add"),)).problem(L)  # "add" is counted like a part, but is none
    assert not_a_part is not None and not_a_part[0] == "intervention.skip[0].part"


def test_the_echo_names_a_vector_never_its_floats() -> None:
    v = vec(5)
    inline = VectorAdd.of(1, v, 0.5, "prompt")
    echo = Intervention(add=(inline, VectorAdd.of(0, v, name="caps"))).to_dict()
    assert echo["add"][1] == {"layer": 0, "name": "caps", "coeff": 1.0, "positions": "all"}
    first = echo["add"][0]
    assert first["vector"] == {"norm": pytest.approx(float(v.norm()), rel=1e-6), "sha256": inline.digest}
    assert len(inline.digest) == 12 and inline.digest != VectorAdd.of(1, vec(6)).digest
    assert "inline" in inline.label and inline.digest in inline.label
    assert Intervention(skip=((0, "mlp"),)).to_dict() == {"skip": [{"layer": 0, "part": "mlp"}], "scale": []}


# ---- the reference forward against a forward written out here


@torch.no_grad()
def manual_forward(model: Transformer, idx: torch.Tensor, iv: Intervention, n_prompt: int) -> torch.Tensor:
    """Logits (1, T, V) of `idx` (1, T) with `iv`'s gates and vectors applied by hand: after block `layer`, each
    vector times its coefficient at the positions it names (a position p >= n_prompt is generated)."""
    T = idx.shape[1]
    gen = torch.arange(T) >= n_prompt  # (T,)
    x = model.wte(idx) + model.wpe(torch.arange(T))
    skipped = {
        (layer, p)
        for layer, part in iv.skip
        for p in ((0, 1) if part == "block" else ((0,) if part == "attn" else (1,)))
    }
    for layer, block in enumerate(model.layers):
        a = block.attn(block.ln_1(x))
        if block.residual:
            x = x if (layer, 0) in skipped else x + a
            m = block.mlp(block.ln_2(x))
            x = x if (layer, 1) in skipped else x + m
        else:
            x = x if (layer, 0) in skipped else a
            m = block.mlp(block.ln_2(x))
            x = x if (layer, 1) in skipped else m
        for entry in iv.add:
            if entry.layer == layer:
                where = {"all": torch.ones(T, dtype=torch.bool), "prompt": ~gen, "generated": gen}[entry.positions]
                x = x + where[None, :, None] * (entry.coeff * torch.tensor(entry.vector))
    return model.unembed(model.ln_f(x))


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(
    "iv",
    [
        Intervention(add=(add(1, 0, 1.5),)),
        Intervention(add=(add(0, 1, 1.0, "prompt"), add(2, 2, -2.0, "generated"))),
        Intervention(skip=((1, "block"),), add=(add(1, 3, 1.0),)),  # a skipped block's output still gets it
    ],
)
def test_reference_forward_adds_after_block_layer_at_its_positions(residual: bool, iv: Intervention) -> None:
    model = build_model(dataclasses.replace(ModelConfig(**TINY), residual=residual), seed=3)
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    n_prompt = 7
    with torch.no_grad():
        got = model(idx, edits=iv.compile(L, n_prompt=n_prompt), return_resid=True)
    torch.testing.assert_close(got.logits, manual_forward(model, idx, iv, n_prompt), atol=1e-5, rtol=1e-5)
    plain = model(idx).logits
    assert (got.logits - plain).abs().max() > 1e-2  # the vector matters
    # resid_post of the block it follows sees it; resid_pre of the next block is that same stream
    layer = iv.add[0].layer
    if layer + 1 < L:
        assert torch.equal(got.resid[layer]["resid_post"], got.resid[layer + 1]["resid_pre"])


# ---- the steps against the reference forward

ROWS = [None, STEER, STEER_GEN, STEER_PROMPT]  # rows with and without vectors, in one batch
N_PROMPT = [3, 4, 6, 9]  # each row's prompt length: positions from there on are generated


def _edits(rows: list[Intervention | None]) -> StreamEdits | None:
    return StreamEdits.stack([iv.compile(L, n_prompt=n) if iv else None for iv, n in zip(rows, N_PROMPT, strict=True)])


def _steps(model: Transformer) -> list[tuple[str, object, float]]:
    steps: list[tuple[str, object, float]] = [("torchscript", FastDecoder(model), 1e-4)]
    if float16_weights_available():
        steps.append(("torchscript-f16", FastDecoder(model, weights="float16"), 3e-2))
    if fused_available():
        steps += [
            ("fused", FusedDecoder(model, weights="float32"), 1e-4),
            ("fused-f16", FusedDecoder(model, weights="float16"), 3e-2),
        ]
    return steps


@pytest.mark.parametrize("residual", [True, False])
def test_steps_equal_the_reference_with_vectors_prefill_and_decode(residual: bool) -> None:
    """Rows with no vector, one at every position, at generated or prompt positions only (with gates too), decoded
    across their prompt/generated boundary to the end of the window; each step's logits and traced stream."""
    model = build_model(dataclasses.replace(ModelConfig(**TINY), residual=residual), seed=4)
    cfg = model.config
    edits = _edits(ROWS)
    seqs = torch.randint(0, 256, (4, cfg.block_size), generator=torch.Generator().manual_seed(1))
    lengths = [2, 3, 6, 5]  # prefill some rows past their prompt, some short of it
    for name, step, tol in _steps(model):
        cache, step_cache = KVCache(cfg, 4), KVCache(cfg, 4)
        with torch.no_grad():
            for b, n in enumerate(lengths):
                row = StreamEdits(*(t[b : b + 1] if t is not None else None for t in edits))
                model(seqs[b : b + 1, :n], cache=cache.rows(b, b + 1), pos=torch.tensor([0]), edits=row)
                if name.startswith("fused"):  # the fused step's own prefill (prompt positions as rows)
                    got = step.prefill(seqs[b, :n], step_cache.rows(b, b + 1), row, trace=True)
                    ref = model(seqs[b : b + 1, :n], edits=row, return_resid=True)
                    torch.testing.assert_close(got.logits, ref.logits[:, -1], atol=tol, rtol=0, msg=name)
                    want = torch.stack([ref.resid[0]["resid_pre"][0, -1]] + [r["resid_post"][0, -1] for r in ref.resid])
                    torch.testing.assert_close(got.stream[:, 0], want, atol=tol, rtol=1e-3, msg=name)
                else:
                    model(seqs[b : b + 1, :n], cache=step_cache.rows(b, b + 1), pos=torch.tensor([0]), edits=row)
        pos = torch.tensor(lengths)
        while int(pos.max()) < cfg.block_size:
            tokens = seqs[torch.arange(4), pos]
            with torch.no_grad():
                ref = model(tokens[:, None], cache=cache, pos=pos, edits=edits, return_resid=True)
            got = step(tokens, step_cache, pos, edits, torch.tensor([0, 2, 3]))
            torch.testing.assert_close(got.logits, ref.logits[:, -1], atol=tol, rtol=0, msg=name)
            want = torch.stack([ref.resid[0]["resid_pre"][:, 0]] + [r["resid_post"][:, 0] for r in ref.resid])
            torch.testing.assert_close(got.stream, want[:, [0, 2, 3]], atol=tol, rtol=1e-3, msg=name)
            pos = pos + 1


def test_a_zero_vector_changes_no_number(model: Transformer) -> None:
    """A row next to steered rows adds zeros: its numbers are bitwise those of a batch where no row steers (add
    None: the same ops as before vectors existed)."""
    gates = StreamEdits.stack([Intervention(skip=((0, "block"),)).compile(L), None])
    assert gates is not None and gates.add is None
    for _, step, _ in _steps(model):
        cfg = model.config
        c1, c2 = KVCache(cfg, 2), KVCache(cfg, 2)
        tokens, pos = torch.tensor([65, 66]), torch.tensor([0, 0])
        zero = StreamEdits(gates.gates, torch.zeros(2, L, 2, C), torch.tensor([0, 0]))
        a, b = step(tokens, c1, pos, gates).logits, step(tokens, c2, pos, zero).logits
        assert torch.equal(a, b)


# ---- the engine: isolation, greedy = reference, the trace = diagnostics


def _generate(engine: Engine, prompt: list[int], **params) -> asyncio.Future:
    return asyncio.ensure_future(events_of(engine.submit(prompt, SamplingParams(**params))))


@pytest.mark.parametrize("decode_backend", ["torchscript", "auto"])
def test_steered_rows_do_not_change_their_neighbours(model: Transformer, decode_backend: str) -> None:
    base = dict(max_new_tokens=20, temperature=0.9, seed=7)
    kw = {"decode_backend": decode_backend}
    alone, _ = run_with_engine(model, lambda e: _generate(e, PROMPT, **base), **kw)

    async def mixed(engine: Engine):
        return await asyncio.gather(
            _generate(engine, tokenizer.encode("Shortcut!"), max_new_tokens=18, intervention=STEER, seed=1),
            _generate(engine, PROMPT, **base),
            _generate(engine, PROMPT, **base, intervention=STEER_GEN),
            _generate(engine, PROMPT, max_new_tokens=12, temperature=0, intervention=STEER_PROMPT, trace=True),
        )

    results = run_with_engine(model, mixed, **kw)
    assert ids(results[1][0]) == ids(alone)
    assert ids(results[2][0]) != ids(alone)  # same seed, steered: different text


@pytest.mark.parametrize("decode_backend", ["torchscript", "auto"])
@pytest.mark.parametrize("iv", [STEER, STEER_GEN, STEER_PROMPT])
def test_greedy_steered_generation_equals_the_reference(
    model: Transformer, iv: Intervention, decode_backend: str
) -> None:
    """The engine's prompt/generated split: a full forward per token with the prompt's length as n_prompt."""
    edits = iv.compile(L, n_prompt=len(PROMPT))
    idx, want = list(PROMPT), []
    with torch.no_grad():
        for _ in range(16):
            tok = int(model(torch.tensor([idx]), edits=edits).logits[0, -1].argmax())
            want.append(tok)
            idx.append(tok)
    tokens, _ = run_with_engine(
        model,
        lambda e: _generate(e, PROMPT, max_new_tokens=16, temperature=0, intervention=iv),
        decode_backend=decode_backend,
    )
    assert ids(tokens) == want


@pytest.mark.parametrize("decode_backend", ["torchscript", "auto"])
def test_trace_and_diagnostics_under_a_vector_equal_the_reference(model: Transformer, decode_backend: str) -> None:
    iv = Intervention(add=(add(1, 7, 1.5),))  # every position: what diagnostics (all prompt) applies too
    tokens, _ = run_with_engine(
        model,
        lambda e: _generate(e, PROMPT, max_new_tokens=10, temperature=0.8, seed=3, trace=True, intervention=iv),
        decode_backend=decode_backend,
    )
    seq = PROMPT + ids(tokens)
    diag = run_diagnostics(model, seq[:-1], DiagnosticsOptions(per_token=True, intervention=iv))
    with torch.no_grad():
        ref = model(torch.tensor([seq[:-1]]), edits=iv.compile(L), return_resid=True)
    norms = torch.stack([r["resid_post"][0].norm(dim=-1) for r in ref.resid])  # (L, T)
    diag_norms = torch.tensor([layer["resid_post"]["per_token"] for layer in diag["layers"]])
    torch.testing.assert_close(diag_norms, norms, rtol=1e-4, atol=1e-4)
    assert diag["layers"][1]["intervened"] and not diag["layers"][0]["intervened"]
    loss = F.cross_entropy(ref.logits[0, :-1], torch.tensor(seq[1:-1]))
    assert diag["loss"] == pytest.approx(float(loss), rel=1e-4)
    for i, t in enumerate(tokens):
        p = len(PROMPT) - 1 + i
        torch.testing.assert_close(torch.tensor(t.trace["resid_norm"]), norms[:, p], rtol=1e-4, atol=1e-4)


# ---- behaviour with the shipped model

LINES = [
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "All the world's a stage, and all the men and women merely players;",
    "Friends, Romans, countrymen, lend me your ears;",
    "Good night, good night! Parting is such sweet sorrow",
]
LOWER_PROMPTS = ["and so i say to you, my good friend, ", "the king is dead, and ", "i will not go there, for "]


def upper_fraction(texts: list[str]) -> float:
    letters = [c for t in texts for c in t if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="the shipped checkpoint is not here")
def test_an_upper_case_vector_makes_greedy_text_upper_case() -> None:
    """Vector = mean resid_post[4] over a few lines in UPPER case minus the same lines in lower case; greedy text on
    lower-case prompts gets more upper case with coeff 0, 0.5, 1 (measured: ~0.03, ~0.2, ~0.85)."""
    model = load_checkpoint(CHECKPOINT).model.eval()
    layer = 4

    @torch.no_grad()
    def mean_resid(lines: list[str]) -> torch.Tensor:
        outs = [model(torch.tensor([tokenizer.encode(s)]), return_resid=True) for s in lines]
        return torch.stack([o.resid[layer]["resid_post"][0].mean(0) for o in outs]).mean(0)  # type: ignore[index]

    vector = mean_resid([s.upper() for s in LINES]) - mean_resid([s.lower() for s in LINES])
    step = FastDecoder(model)

    @torch.no_grad()
    def greedy(prompt: str, coeff: float, n: int = 40) -> str:
        ids_ = tokenizer.encode(prompt)
        edits = Intervention(add=(VectorAdd.of(layer, vector, coeff),)).compile(
            model.config.n_layer, n_prompt=len(ids_)
        )
        cache = KVCache(model.config, 1)
        logits = model(torch.tensor([ids_]), cache=cache, pos=torch.tensor([0]), edits=edits).logits[:, -1]
        out: list[int] = []
        for i in range(n):
            out.append(int(logits.argmax()))
            logits = step(torch.tensor(out[-1:]), cache, torch.tensor([len(ids_) + i]), edits).logits
        return tokenizer.decode(out)

    fractions = [upper_fraction([greedy(p, c) for p in LOWER_PROMPTS]) for c in (0.0, 0.5, 1.0)]
    assert fractions[0] < fractions[1] < fractions[2], fractions
    assert fractions[0] < 0.15 and fractions[2] > 0.6, fractions
