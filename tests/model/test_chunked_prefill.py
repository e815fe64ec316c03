"""Chunked prefill (issue #28 item 3): a prompt that arrives while rows run is prefilled `prefill_chunk` tokens per
step into a staging row, and gives what a prefill in one piece gives: the same logits (bit for bit through the fused
step, whose rows are computed alone; to tolerance through the reference forward of the TorchScript backend), the same
trace, the same greedy text, with interventions at prompt or generated positions; its neighbours are untouched; and a
request cancelled, timed out or aborted mid-prefill leaves cleanly."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from model import tokenizer
from model.config import ModelConfig
from model.edits import Intervention, VectorAdd
from model.engine import Engine, EngineObserver, FinishEvent, SamplingParams, TokenEvent
from model.engine.request import Request
from model.engine.scheduler import Scheduler
from model.fast import fused_available
from model.transformer import Transformer
from tests.conftest import build_model

CFG = ModelConfig(block_size=64, n_layer=3, n_head=4, d_model=32, d_ff=64)
PROMPT = tokenizer.encode("To be, or not to be, that is the question:")  # 42 tokens: chunks of 8 -> 6 chunks
BACKGROUND = tokenizer.encode("Residual")
CHUNK = 8
NO_FUSED = "the fused step is not built here (make builds it)"


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(CFG, seed=3)


def intervention() -> Intervention:
    """Skip, scale, and vectors added at prompt and at generated positions."""
    g = torch.Generator().manual_seed(5)
    return Intervention(
        skip=((1, "mlp"),),
        scale=((0, "attn", 0.5),),
        add=(
            VectorAdd.of(0, torch.randn(CFG.d_model, generator=g), 2.0, positions="prompt"),
            VectorAdd.of(2, torch.randn(CFG.d_model, generator=g), 3.0, positions="generated"),
        ),
    )


@dataclass
class Spy:
    """Records the runner's prefills (which prompt positions, the logits of the prompt's last position) and can act
    after a chunk (from the worker thread)."""

    prompt: list[int]
    after_chunk: Callable[[Engine, Request, int], None] | None = None
    chunks: list[tuple[int, int]] = field(default_factory=list)
    whole: int = 0  # prefills of the prompt in one piece
    logits: torch.Tensor | None = None
    staged_rows: list[tuple[int, int]] = field(default_factory=list)  # (running rows, max) at each chunk

    def attach(self, engine: Engine) -> None:
        runner = engine.runner
        prefill, prefill_chunk = runner.prefill, runner.prefill_chunk

        def whole(batch: list[Request], row: int, plan: Any, want: bool) -> Any:
            out = prefill(batch, row, plan, want)
            for i, r in enumerate(batch):
                if r.prompt == self.prompt:
                    self.whole += 1
                    self.logits = out[0][i].clone()
            return out

        def chunk(req: Request, row: int, start: int, stop: int, plan: Any, want: bool) -> Any:
            out = prefill_chunk(req, row, start, stop, plan, want)
            self.chunks.append((start, stop))
            self.staged_rows.append((len(engine.scheduler.running), engine.max_batch_size))
            if stop == len(req.prompt):
                self.logits = out[0][0].clone()
            if self.after_chunk is not None:
                self.after_chunk(engine, req, len(self.chunks))
            return out

        runner.prefill, runner.prefill_chunk = whole, chunk  # type: ignore[method-assign]


Events = tuple[list[TokenEvent], FinishEvent]


class Gate(EngineObserver):
    """Holds the worker at the first token it emits (the background's, from their prefill) until `release`: what is
    submitted meanwhile arrives next to running rows."""

    def __init__(self) -> None:
        self.first, self.release = threading.Event(), threading.Event()
        self.armed = True

    def arm(self) -> None:
        """Hold the worker again at the next first token."""
        self.first.clear()
        self.release.clear()
        self.armed = True

    def on_first_token(self, ttft_s: float) -> None:
        if self.armed:
            self.armed = False
            self.first.set()
            assert self.release.wait(10), "the test never released the worker"


async def start_behind(engine: Engine, gate: Gate, background: list[tuple[list[int], SamplingParams]]) -> list:
    """Start `engine` with `background` requests prefilled together and hold it at their first token (see Gate)."""
    handles = [engine.submit(p, sp) for p, sp in background]
    engine.start()
    if not background:
        gate.release.set()
    end = time.monotonic() + 20
    while background and not gate.first.is_set():
        assert time.monotonic() < end, "the background never started"
        await asyncio.sleep(0.001)
    return handles


def run(
    model: Transformer,
    chunk: int,
    params: SamplingParams,
    *,
    backend: str = "torchscript",
    weights: str = "float32",
    background: list[SamplingParams] | None = None,
    after: list[tuple[list[int], SamplingParams]] | None = None,
    spy: Spy | None = None,
    max_batch_size: int = 4,
    prompt: list[int] = PROMPT,
) -> tuple[Events, list[Events], list[Events], Spy]:
    """`background` requests start decoding, then `prompt` with `params` arrives (then the `after` requests): (its
    events, the background's, the after's, the spy)."""
    spy = spy or Spy(PROMPT)
    background = [SamplingParams(max_new_tokens=40, temperature=0.0)] if background is None else background

    async def body() -> tuple[Events, list[Events], list[Events]]:
        gate = Gate()
        engine = Engine(
            model,
            max_batch_size=max_batch_size,
            prefill_chunk=chunk,
            decode_backend=backend,
            decode_weights=weights,
            observer=gate,
        )
        spy.attach(engine)
        try:
            bg = await start_behind(engine, gate, [(BACKGROUND, p) for p in background])
            handle = engine.submit(prompt, params)
            later = [engine.submit(p, sp) for p, sp in after or ()]
            gate.release.set()
            got = await asyncio.wait_for(
                asyncio.gather(handle.result(), *(h.result() for h in bg), *(h.result() for h in later)), 30
            )
            assert await engine.wait_idle(5)
            assert engine.scheduler.staged is None
            return got[0], list(got[1 : 1 + len(bg)]), list(got[1 + len(bg) :])
        finally:
            engine.stop()

    new, bg, later = asyncio.run(body())
    return new, bg, later, spy


def need(backend: str) -> None:
    if backend == "fused" and not fused_available():
        pytest.skip(NO_FUSED)


@torch.no_grad()
def greedy_reference(
    model: Transformer, prompt: list[int], n: int, iv: Intervention | None = None
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by a full forward over the whole sequence at every step (no cache), and the logits at the
    prompt's last position."""
    edits = iv.compile(model.config.n_layer, torch.device("cpu"), n_prompt=len(prompt)) if iv is not None else None
    idx, out, first = list(prompt), [], None
    for _ in range(n):
        logits = model(torch.tensor([idx]), edits=edits).logits[0, -1]
        first = logits if first is None else first
        out.append(int(logits.argmax()))
        idx.append(out[-1])
    assert first is not None
    return out, first


def ids(events: Events) -> list[int]:
    return [t.token_id for t in events[0]]


BACKENDS = [("torchscript", "float32"), ("fused", "float32"), ("fused", "float16")]


@pytest.mark.parametrize(("backend", "weights"), BACKENDS)
@pytest.mark.parametrize("edited", [False, True])
def test_chunked_equals_one_piece(model: Transformer, backend: str, weights: str, edited: bool) -> None:
    """Next to a running row, the prompt goes in chunks of CHUNK (the last one shorter), and its logits, greedy text,
    logprobs and trace equal those of the same prompt prefilled in one piece next to the same row: bit for bit
    through the fused step, to tolerance through the reference forward; and (float32) the text of a full forward."""
    need(backend)
    iv = intervention() if edited else None
    params = SamplingParams(
        max_new_tokens=12, temperature=0.0, trace=True, logit_lens_top=2, logprobs=3, intervention=iv
    )
    chunked, bg_c, _, spy_c = run(model, CHUNK, params, backend=backend, weights=weights)
    whole, bg_w, _, spy_w = run(model, 0, params, backend=backend, weights=weights)

    n = len(PROMPT)
    assert spy_c.chunks == [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)] and spy_c.whole == 0
    assert spy_w.chunks == [] and spy_w.whole == 1
    assert chunked[1].reason == whole[1].reason == "length"
    assert ids(chunked) == ids(whole)
    assert ids(bg_c[0]) == ids(bg_w[0])  # the running row is untouched by the chunks
    assert spy_c.logits is not None and spy_w.logits is not None
    traces_c = [t.trace for t in chunked[0]]
    traces_w = [t.trace for t in whole[0]]
    assert traces_c[0] is not None and traces_c[0]["position"] == n - 1
    lp_c = [(t.logprob, t.top_logprobs) for t in chunked[0]]
    lp_w = [(t.logprob, t.top_logprobs) for t in whole[0]]
    if backend == "fused":  # each position is a row of the step, computed alone: the same numbers
        assert torch.equal(spy_c.logits, spy_w.logits)
        assert traces_c == traces_w
        assert lp_c == lp_w
    else:
        torch.testing.assert_close(spy_c.logits, spy_w.logits, rtol=1e-4, atol=1e-4)
        for a, b in zip(traces_c, traces_w, strict=True):
            assert a is not None and b is not None
            torch.testing.assert_close(
                torch.tensor(a["resid_norm"]), torch.tensor(b["resid_norm"]), rtol=1e-4, atol=1e-4
            )
        torch.testing.assert_close(
            torch.tensor([lp for lp, _ in lp_c]), torch.tensor([lp for lp, _ in lp_w]), rtol=1e-4, atol=1e-4
        )
    if weights == "float32":  # an independent computation: a full forward (with the edits) at every step
        want, first = greedy_reference(model, PROMPT, 12, iv)
        assert ids(chunked) == want
        torch.testing.assert_close(spy_c.logits, first, rtol=1e-4, atol=1e-4)
        want_bg, _ = greedy_reference(model, BACKGROUND, 40)
        assert ids(bg_c[0]) == want_bg


@pytest.mark.parametrize(("backend", "weights"), BACKENDS[:2])
@pytest.mark.parametrize("n_background", [1, 3])
def test_mixed_batch_joins_at_its_row_and_sampled_rows_stay_isolated(
    model: Transformer, backend: str, weights: str, n_background: int
) -> None:
    """1 running row: the prompt joins at row 1 (its staging row, 3, copied there); 3 running rows: it joins at its
    staging row. Sampled and edited neighbours give what they give alone; admission never takes the staging row."""
    need(backend)
    bg = [
        SamplingParams(max_new_tokens=30, temperature=0.9, seed=11 + i, intervention=intervention() if i else None)
        for i in range(n_background)
    ]
    params = SamplingParams(max_new_tokens=10, temperature=0.8, seed=4)
    chunked, bg_c, _, spy = run(model, CHUNK, params, backend=backend, weights=weights, background=bg)
    assert spy.chunks and all(rows < cap for rows, cap in spy.staged_rows)  # running + staged <= max_batch_size
    for p, got in zip(bg, bg_c, strict=True):
        alone, _, _, _ = run(model, 0, p, backend=backend, weights=weights, background=[], prompt=BACKGROUND)
        assert ids(got) == ids(alone)
    alone, _, _, _ = run(model, 0, params, backend=backend, weights=weights, background=[])
    assert ids(chunked) == ids(alone)


def test_the_rest_goes_in_one_piece_once_no_row_runs(model: Transformer) -> None:
    """max_batch_size 2: the one running row ends after the first chunk; the rest of the prompt goes in one piece and
    joins at row 0 (copied from its staging row, 1); two short requests sent with it follow, one at a time. Every
    output equals a full forward's."""
    short = tokenizer.encode("ab")
    bg = [SamplingParams(max_new_tokens=3, temperature=0.0)]
    after = [(short, SamplingParams(max_new_tokens=8, temperature=0.0)) for _ in range(2)]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    new, bg_out, later, spy = run(model, CHUNK, params, background=bg, after=after, max_batch_size=2)
    assert spy.chunks == [(0, CHUNK), (CHUNK, len(PROMPT))]
    assert ids(new) == greedy_reference(model, PROMPT, 10)[0]
    assert ids(bg_out[0]) == greedy_reference(model, BACKGROUND, 3)[0]
    want = greedy_reference(model, short, 8)[0]
    assert [ids(e) for e in later] == [want, want]


def _request(i: int, prompt: list[int]) -> Request:
    return Request(
        id=i,
        prompt=prompt,
        params=SamplingParams(),
        seed=0,
        loop=None,  # type: ignore[arg-type] - never delivered to
        queue=None,  # type: ignore[arg-type]
        t_submit=0.0,
        deadline=None,
        generator=torch.Generator(),
        edits=None,
        text=None,  # type: ignore[arg-type]
        controls=None,
        group=("request", i),
    )


def test_admission_never_takes_the_staging_row() -> None:
    """Scheduler alone, max_batch_size 3: a long prompt is staged next to a running row (in row 2); nothing else is
    admitted while it is chunked next to rows; if the running row leaves before its chunk, admission (unchunked: no
    row runs) fills rows 0 and 1 only, and the staged request joins after them, at its staging row."""
    sched = Scheduler(threading.Condition(), torch.device("cpu"), max_batch_size=3, max_queue=16, prefill_tokens=64)
    sched.prefill_chunk = 4
    running = _request(1, [1, 2])
    sched.join([running])
    long = _request(2, list(range(10)))
    shorts = [_request(3 + i, [5]) for i in range(3)]
    for r in (long, *shorts):
        sched.add(r)
    assert sched.admit() == ([], []) and sched.staged is not None and sched.staged.req is long
    assert sched.staged.row == 2
    assert sched.admit() == ([], [])  # chunking next to rows: the staged prompt has the step's budget
    assert sched.next_chunk()[2:4] == (0, 4)
    running.cancelled = True
    sched.mark_dirty()
    assert [r for r, _ in sched.reap(0.0).ended] == [running] and sched.staged is not None
    batch, _ = sched.admit()
    assert batch == shorts[:2]  # rows 0 and 1: not the staging row
    sched.join(batch)
    chunk = sched.next_chunk()
    assert chunk[2:4] == (0, 4)  # rows run again: chunked
    sched.chunk_done(chunk)
    for _ in range(2):
        chunk = sched.next_chunk()
        assert sched.chunk_done(chunk) == (2 if chunk.last else None)
    assert chunk.last and sched.staged is None and sched.running == [*shorts[:2], long]


def test_an_idle_engine_prefills_at_once(model: Transformer) -> None:
    """No row running: the prompt is prefilled in one piece (the best time to first token)."""
    new, _, _, spy = run(model, CHUNK, SamplingParams(max_new_tokens=3, temperature=0.0), background=[])
    assert spy.whole == 1 and spy.chunks == []
    assert ids(new) == greedy_reference(model, PROMPT, 3)[0]


@pytest.mark.parametrize("how", ["cancel", "timeout", "abort_all"])
def test_a_request_ended_mid_prefill_leaves_cleanly(model: Transformer, how: str) -> None:
    """After its second chunk the request is cancelled, runs past its deadline, or the drain deadline passes: it
    finishes with no token (abort / timeout), its staging row is free again, and the engine goes on serving."""
    handles: dict[str, Any] = {}

    def act(engine: Engine, req: Request, n: int) -> None:
        if n != 2:
            return
        if how == "cancel":
            handles["cancel"]()
        elif how == "timeout":
            time.sleep(0.6)  # past the 0.5 s request timeout
        else:
            engine.abort_all()

    spy = Spy(PROMPT, after_chunk=act)

    async def body() -> tuple[Events, Events, list[int]]:
        gate = Gate()
        engine = Engine(model, max_batch_size=3, prefill_chunk=CHUNK, decode_weights="float32", observer=gate)
        spy.attach(engine)
        engine.request_timeout_s = 0.5 if how == "timeout" else None
        try:
            (bg,) = await start_behind(engine, gate, [(BACKGROUND, SamplingParams(max_new_tokens=40, temperature=0.0))])
            handle = engine.submit(PROMPT, SamplingParams(max_new_tokens=5, temperature=0.0))
            handles["cancel"] = handle.cancel
            gate.release.set()
            got = await asyncio.wait_for(handle.result(), 20)
            bg_got = await asyncio.wait_for(bg.result(), 20)
            assert await engine.wait_idle(5)
            assert engine.scheduler.staged is None and engine.n_running == 0
            if how == "abort_all":
                return got, bg_got, []
            # the engine goes on: a prompt staged again into the same row, next to a running row, is right
            spy.after_chunk = None
            engine.request_timeout_s = None
            gate.arm()
            bg2 = engine.submit(BACKGROUND, SamplingParams(max_new_tokens=30, temperature=0.0))
            while not gate.first.is_set():
                await asyncio.sleep(0.001)
            handle = engine.submit(PROMPT, SamplingParams(max_new_tokens=5, temperature=0.0))
            gate.release.set()
            again = await asyncio.wait_for(handle.result(), 20)
            await asyncio.wait_for(bg2.result(), 20)
            return got, bg_got, [t.token_id for t in again[0]]
        finally:
            engine.stop()

    (tokens, fin), (bg_tokens, bg_fin), again = asyncio.run(body())
    assert tokens == [] and fin.completion_tokens == 0
    assert fin.reason == {"cancel": "abort", "timeout": "timeout", "abort_all": "abort"}[how]
    assert spy.chunks[:2] == [(0, CHUNK), (CHUNK, 2 * CHUNK)]
    if how != "abort_all":
        assert len(spy.chunks) == 2 + (len(PROMPT) + CHUNK - 1) // CHUNK  # none after the end; all of the next one
    if how == "cancel":
        assert (
            bg_fin.reason == "length" and [t.token_id for t in bg_tokens] == greedy_reference(model, BACKGROUND, 40)[0]
        )
    if how != "abort_all":
        assert again == greedy_reference(model, PROMPT, 5)[0]


def test_drain_waits_for_a_request_mid_prefill(model: Transformer) -> None:
    """The running row ends after the first chunk; the drain begins after the second (the rest), before the request
    joins the running rows: no row runs and none waits, yet the engine is not idle; the request is served in full,
    and the engine is idle only after it."""
    idle: dict[str, bool] = {}
    looked = threading.Event()
    spy = Spy(PROMPT)

    def act(engine: Engine, req: Request, n: int) -> None:
        if n == 2:
            assert not engine.scheduler.running and engine.scheduler.staged is not None
            engine.begin_drain()
            assert looked.wait(10), "the test never looked"  # (the request stays mid-prefill meanwhile)

    async def body() -> Events:
        gate = Gate()
        engine = Engine(model, max_batch_size=3, prefill_chunk=CHUNK, decode_weights="float32", observer=gate)
        spy.after_chunk = act
        spy.attach(engine)
        try:
            await start_behind(engine, gate, [(BACKGROUND, SamplingParams(max_new_tokens=3, temperature=0.0))])
            handle = engine.submit(PROMPT, SamplingParams(max_new_tokens=6, temperature=0.0))
            gate.release.set()
            while engine.accepting:
                await asyncio.sleep(0.001)
            idle["early"] = engine.n_running == 0 and engine.n_waiting == 0 and engine.n_jobs == 0
            looked.set()
            assert await engine.wait_idle(20)
            return await asyncio.wait_for(handle.result(), 1)
        finally:
            engine.stop()

    tokens, fin = asyncio.run(body())
    assert spy.chunks == [(0, CHUNK), (CHUNK, len(PROMPT))]
    assert not idle["early"]  # mid-prefill, the request counts as running
    assert fin.reason == "length" and [t.token_id for t in tokens] == greedy_reference(model, PROMPT, 6)[0]
