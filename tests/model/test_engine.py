"""Engine in-process: greedy == full-forward greedy, seeds, stop strings, batching, cancel/timeout/drain, sampling."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import pytest
import torch

from model import tokenizer
from model.config import ModelConfig
from model.decode import float16_weights_available
from model.diagnostics import residual_norms_last
from model.engine import (
    Engine,
    EngineDrainingError,
    EngineObserver,
    FinishEvent,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from model.sampling import sample_rows
from model.transformer import Transformer
from tests.conftest import TINY, build_model

WINDOW = TINY["block_size"]  # 32
PROMPT = tokenizer.encode("Residual")  # 8 tokens


@pytest.fixture(scope="module")
def model() -> Transformer:
    return build_model(ModelConfig(**TINY), seed=0)


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with a full forward over the whole sequence at every step (no cache)."""
    idx = list(prompt)
    out: list[int] = []
    for _ in range(n):
        logits = model(torch.tensor([idx])).logits[0, -1]  # (V,)
        tok = int(logits.argmax())
        out.append(tok)
        idx.append(tok)
    return out


def run_with_engine(
    model: Transformer, body: Callable[[Engine], Awaitable[Any]], start: bool = True, **engine_kw: Any
) -> Any:
    """Run `body(engine)` in a fresh event loop; the engine is always stopped afterwards."""

    async def main() -> Any:
        engine = Engine(model, **{"decode_weights": "float32", **engine_kw})  # exact, to compare with references
        if start:
            engine.start()
        try:
            return await body(engine)
        finally:
            engine.stop()

    return asyncio.run(main())


async def events_of(handle: RequestHandle) -> tuple[list[TokenEvent], FinishEvent]:
    """Every event of a request, with a deadline so a bug cannot hang the suite."""
    return await asyncio.wait_for(handle.result(), timeout=20)


def ids(tokens: list[TokenEvent]) -> list[int]:
    return [t.token_id for t in tokens]


class Recorder(EngineObserver):
    """Records decode batch sizes; can block the worker on a request's first token."""

    def __init__(self, block_first_token: bool = False, sleep_first_token: float = 0.0) -> None:
        self.steps: list[int] = []
        self.block = block_first_token
        self.sleep = sleep_first_token
        self.first_token = threading.Event()
        self.release = threading.Event()

    def on_step(self, batch_size: int) -> None:
        self.steps.append(batch_size)

    def on_first_token(self, ttft_s: float) -> None:
        self.first_token.set()
        if self.block:
            assert self.release.wait(10), "test never released the worker"
        if self.sleep:
            threading.Event().wait(self.sleep)


# ---------------------------------------------------------------- greedy equivalence


def test_greedy_equals_full_forward_loop(model: Transformer) -> None:
    ref = greedy_reference(model, PROMPT, 10)

    async def body(engine: Engine) -> tuple[list[TokenEvent], FinishEvent]:
        return await events_of(engine.submit(PROMPT, SamplingParams(max_new_tokens=10, temperature=0.0)))

    tokens, fin = run_with_engine(model, body)
    assert ids(tokens) == ref
    assert fin.reason == "length" and fin.completion_tokens == 10 and fin.prompt_tokens == len(PROMPT)
    assert fin.text == tokenizer.decode(ref)
    assert "".join(t.text for t in tokens) == fin.text


def test_greedy_in_a_batch_with_rows_leaving(model: Transformer) -> None:
    """Concurrent greedy requests of different lengths (rows finish and move) each equal their own reference."""
    jobs = [
        (tokenizer.encode("abc"), 20),
        (tokenizer.encode("The cat sat"), 4),
        (tokenizer.encode("x"), 25),
        (tokenizer.encode("0123456789ab"), 12),
        (tokenizer.encode("zz top"), 9),
    ]

    async def body(engine: Engine) -> list[list[int]]:
        handles = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0)) for p, n in jobs[:4]]
        engine.start()
        await asyncio.sleep(0.002)
        handles.append(engine.submit(jobs[4][0], SamplingParams(max_new_tokens=jobs[4][1], temperature=0.0)))
        results = await asyncio.gather(*(events_of(h) for h in handles))
        return [ids(tokens) for tokens, _ in results]

    rec = Recorder()
    got = run_with_engine(model, body, start=False, observer=rec, max_batch_size=8)
    for (prompt, n), tokens in zip(jobs, got, strict=True):
        assert tokens == greedy_reference(model, prompt, n)
    assert rec.steps[0] >= 4  # the four submitted before start ran as one batch


def test_rows_ending_together_move_only_live_rows(model: Transformer) -> None:
    """Rows 0, 2, 4 of six end in the same step: the two live rows above the new size (3 and 5) fill holes 0 and 2,
    two row copies; no ended row is ever copied. When every row ends at once nothing is copied."""

    def copies_and_tokens(lengths: list[int]) -> tuple[int, list[list[int]]]:
        prompts = [tokenizer.encode(f"p{i} said") for i in range(len(lengths))]
        copies: list[tuple[int, int]] = []

        async def body(engine: Engine) -> list[list[int]]:
            real = engine.cache.copy_row

            def counted(src: int, dst: int) -> None:
                copies.append((src, dst))
                real(src, dst)

            engine.cache.copy_row = counted  # type: ignore[method-assign]
            handles = [
                engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0))
                for p, n in zip(prompts, lengths, strict=True)
            ]
            engine.start()
            return [ids(tokens) for tokens, _ in await asyncio.gather(*(events_of(h) for h in handles))]

        got = run_with_engine(model, body, start=False, max_batch_size=8)
        for p, n, tokens in zip(prompts, lengths, got, strict=True):
            assert tokens == greedy_reference(model, p, n)
        return len(copies), got

    assert copies_and_tokens([3, 9, 3, 9, 3, 9])[0] == 2
    assert copies_and_tokens([5, 5, 5, 5])[0] == 0


def test_one_wake_up_per_step_delivers_every_rows_event_in_order(model: Transformer) -> None:
    """Eight rows prefilled together: each step's token events reach the event loop in one call_soon_threadsafe
    (the prefill, 4 decode steps, then one for the eight finish events), each request's events in order."""
    prompts = [tokenizer.encode(f"row {i} says") for i in range(8)]
    calls: list[int] = []

    async def body(engine: Engine) -> list[tuple[list[TokenEvent], FinishEvent]]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(callback: Callable[..., Any], *args: Any, **kw: Any) -> Any:
            if args and isinstance(args[0], list):  # the engine's deliveries (asyncio schedules others)
                calls.append(len(args[0]))  # events in one callback
            return real(callback, *args, **kw)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        handles = [engine.submit(p, SamplingParams(max_new_tokens=5, temperature=0.0)) for p in prompts]
        engine.start()
        return list(await asyncio.gather(*(events_of(h) for h in handles)))

    got = run_with_engine(model, body, start=False, max_batch_size=8)
    for p, (tokens, fin) in zip(prompts, got, strict=True):
        assert ids(tokens) == greedy_reference(model, p, 5)
        assert fin.reason == "length" and fin.completion_tokens == 5
        assert "".join(t.text for t in tokens) == fin.text
    assert calls == [8] * 6  # prefill, 4 decode steps, the finish events: 8 rows' events each time


def test_rows_of_two_event_loops_in_one_batch_each_get_their_own_events(model: Transformer) -> None:
    """Requests from two event loops (two threads) decode in the same steps; each loop gets only its own events."""
    engine = Engine(model, decode_weights="float32", max_batch_size=4)
    prompts = {"a": tokenizer.encode("first loop"), "b": tokenizer.encode("second")}
    submitted = threading.Barrier(3)
    results: dict[str, tuple[list[TokenEvent], FinishEvent]] = {}

    def client(name: str) -> None:
        async def main() -> tuple[list[TokenEvent], FinishEvent]:
            handles = [
                engine.submit(prompts[name], SamplingParams(max_new_tokens=6 + i, temperature=0.0)) for i in (0, 1)
            ]
            await asyncio.get_running_loop().run_in_executor(None, submitted.wait, 10)
            for h in handles[1:]:
                await events_of(h)
            return await events_of(handles[0])

        results[name] = asyncio.run(main())

    threads = [threading.Thread(target=client, args=(name,)) for name in prompts]
    for t in threads:
        t.start()
    try:
        submitted.wait(10)
        engine.start()
        for t in threads:
            t.join(30)
    finally:
        engine.stop()
    for name, prompt in prompts.items():
        tokens, fin = results[name]
        assert ids(tokens) == greedy_reference(model, prompt, 6) and fin.reason == "length"


class PrefillRecorder(EngineObserver):
    """Records the batch layout after each change and the resid-norm observations of prefills."""

    wants_resid_norms = True

    def __init__(self) -> None:
        self.layouts: list[tuple[int, int]] = []
        self.norms: list[list[float]] = []

    def on_queue_change(self, running: int, waiting: int) -> None:
        self.layouts.append((running, waiting))

    def on_resid_norms(self, norms: list[float]) -> None:
        self.norms.append(norms)


def test_prompts_prefill_together_padded_within_the_token_budget(model: Transformer) -> None:
    """Prompts of 3, 11 and 7 tokens with a 24-token budget: [3, 11] (padded to 2 x 11) then [7]; each is exact."""
    prompts = [tokenizer.encode("abc"), tokenizer.encode("The cat sat"), tokenizer.encode("0123456")]

    async def body(engine: Engine) -> list[list[int]]:
        handles = [engine.submit(p, SamplingParams(max_new_tokens=6, temperature=0.0)) for p in prompts]
        engine.start()
        return [ids(tokens) for tokens, _ in await asyncio.gather(*(events_of(h) for h in handles))]

    rec = PrefillRecorder()
    got = run_with_engine(model, body, start=False, observer=rec, max_batch_size=4, prefill_tokens=24)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == greedy_reference(model, prompt, 6)
    admitted = [layout for layout in rec.layouts if layout[0] > 0][:2]
    assert admitted == [(2, 1), (3, 0)]  # two prefills: the first took two prompts, the second one
    with torch.no_grad():
        for prompt, norms in zip(prompts, rec.norms, strict=True):
            resid = model(torch.tensor([prompt]), return_resid=True).resid
            assert norms == pytest.approx(residual_norms_last(resid), rel=1e-5)


def test_auto_decode_weights_are_float16_where_fbgemm_runs_them(model: Transformer) -> None:
    want = "float16" if float16_weights_available() else "float32"

    async def body(engine: Engine) -> FinishEvent:
        assert engine.decode_weights == want and engine.decode_step.packed == (want == "float16")
        return (await events_of(engine.submit(PROMPT, SamplingParams(max_new_tokens=12, temperature=0.0))))[1]

    fin = run_with_engine(model, body, decode_weights="auto")
    assert fin.reason == "length" and fin.completion_tokens == 12
    with pytest.raises(ValueError, match="weights must be"):
        Engine(model, decode_weights="int4")


def test_max_new_tokens_gives_length(model: Transformer) -> None:
    async def body(engine: Engine) -> list[tuple[list[TokenEvent], FinishEvent]]:
        return [await events_of(engine.submit(PROMPT, SamplingParams(max_new_tokens=n, seed=3))) for n in (1, 2, 7)]

    for n, (tokens, fin) in zip((1, 2, 7), run_with_engine(model, body), strict=True):
        assert fin.reason == "length"
        assert len(tokens) == n and fin.completion_tokens == n
        assert fin.text == tokenizer.decode(ids(tokens))


# ---------------------------------------------------------------- seeds


SEEDED = SamplingParams(max_new_tokens=20, temperature=1.0, seed=1234)
OTHERS = [
    SamplingParams(max_new_tokens=5, temperature=0.7, top_k=5, seed=1),
    SamplingParams(max_new_tokens=9, temperature=0.0),
    SamplingParams(max_new_tokens=3, temperature=1.3, top_p=0.9, seed=99, logprobs=3),
    SamplingParams(max_new_tokens=11, temperature=1.0),
    SamplingParams(max_new_tokens=8, temperature=0.5, top_k=40, top_p=0.8, seed=7, stop=("q",)),
]


def test_seed_reproducible_alone_and_inside_a_batch(model: Transformer) -> None:
    async def alone(engine: Engine) -> list[int]:
        return ids((await events_of(engine.submit(PROMPT, SEEDED)))[0])

    async def batched(engine: Engine) -> tuple[list[int], list[int]]:
        handles = [engine.submit(tokenizer.encode(f"other {i}"), p) for i, p in enumerate(OTHERS[:2])]
        target = engine.submit(PROMPT, SEEDED)  # sits in row 2; rows 0 and 1 finish first and move rows around
        handles += [engine.submit(tokenizer.encode(f"more {i}"), p) for i, p in enumerate(OTHERS[2:])]
        engine.start()
        first = ids((await events_of(target))[0])
        again = engine.submit(PROMPT, SEEDED)  # joins whatever is still running
        rest = await asyncio.gather(*(events_of(h) for h in handles), events_of(again))
        return first, ids(rest[-1][0])

    reference = run_with_engine(model, alone)
    in_batch, later = run_with_engine(model, batched, start=False, max_batch_size=3)
    assert len(reference) == 20
    assert in_batch == reference
    assert later == reference


def test_different_seeds_differ_and_reported_seed_replays(model: Transformer) -> None:
    async def body(engine: Engine) -> tuple[list[int], list[int], list[int], list[int], int]:
        a = ids((await events_of(engine.submit(PROMPT, SEEDED)))[0])
        b = ids((await events_of(engine.submit(PROMPT, SamplingParams(max_new_tokens=20, seed=1235))))[0])
        tokens, fin = await events_of(engine.submit(PROMPT, SamplingParams(max_new_tokens=20)))
        replay = ids((await events_of(engine.submit(PROMPT, SamplingParams(max_new_tokens=20, seed=fin.seed))))[0])
        return a, b, ids(tokens), replay, fin.seed

    a, b, unseeded, replay, seed = run_with_engine(model, body)
    assert a != b
    assert isinstance(seed, int) and seed >= 0
    assert replay == unseeded


# ---------------------------------------------------------------- stop strings


@pytest.fixture(scope="module")
def ascii_model() -> Transformer:
    """The tiny model with its non-ASCII (tied) embeddings zeroed: it writes one character per token."""
    m = build_model(ModelConfig(**TINY), seed=0)
    with torch.no_grad():
        m.wte.weight[128:] = 0.0
    return m


@pytest.fixture(scope="module")
def greedy_text(ascii_model: Transformer) -> str:
    text = tokenizer.decode(greedy_reference(ascii_model, PROMPT, 24))
    assert text.isascii()
    assert len(set(text[:12])) >= 3, "fixture text too repetitive to test stop strings"
    return text


def _stream(model: Transformer, params: SamplingParams) -> tuple[list[TokenEvent], FinishEvent]:
    async def body(engine: Engine) -> tuple[list[TokenEvent], FinishEvent]:
        return await events_of(engine.submit(PROMPT, params))

    return run_with_engine(model, body)


def test_stop_string_ends_output_and_is_held_back(ascii_model: Transformer, greedy_text: str) -> None:
    i = next(i for i in range(3, 12) if greedy_text.find(greedy_text[i : i + 3]) == i)
    stop = greedy_text[i : i + 3]
    tokens, fin = _stream(ascii_model, SamplingParams(max_new_tokens=24, temperature=0.0, stop=(stop,)))
    assert fin.reason == "stop"
    assert fin.text == greedy_text[:i]
    assert fin.completion_tokens < 24 and len(tokens) == fin.completion_tokens
    # the deltas never released a character of the (partial) stop string, not even before it was complete
    sent = ""
    for t in tokens:
        sent += t.text
        assert greedy_text[:i].startswith(sent)
    assert sent == fin.text


def test_earliest_of_several_stop_strings_wins(ascii_model: Transformer, greedy_text: str) -> None:
    i = next(i for i in range(2, 8) if greedy_text.find(greedy_text[i : i + 2]) == i)
    later = greedy_text[i + 4 : i + 6]
    stops = (later, greedy_text[i : i + 2])
    _, fin = _stream(ascii_model, SamplingParams(max_new_tokens=24, temperature=0.0, stop=stops))
    assert fin.reason == "stop"
    assert fin.text == greedy_text[: min(i, greedy_text.find(later))]


def test_held_back_text_is_released_when_stop_never_completes(ascii_model: Transformer, greedy_text: str) -> None:
    stop = greedy_text[5:7] + "\x00\x01"
    assert stop not in greedy_text
    tokens, fin = _stream(ascii_model, SamplingParams(max_new_tokens=24, temperature=0.0, stop=(stop,)))
    assert fin.reason == "length"
    assert fin.text == greedy_text
    assert "".join(t.text for t in tokens) == greedy_text
    # when the possible stop prefix had just been decoded, it was held: some delta lagged behind the text
    cumulative, lagged = "", False
    for n, t in enumerate(tokens, 1):
        cumulative += t.text
        lagged |= len(cumulative) < len(tokenizer.decode(ids(tokens[:n])).rstrip("\ufffd"))
    assert lagged


# ---------------------------------------------------------------- batching, cancel, timeout, queue, drain


def test_continuous_batching_batches_concurrent_requests(model: Transformer) -> None:
    rec = Recorder()

    async def body(engine: Engine) -> list[FinishEvent]:
        handles = [
            engine.submit(tokenizer.encode(f"req {i}"), SamplingParams(max_new_tokens=15 + i, seed=i)) for i in range(4)
        ]
        engine.start()
        await asyncio.sleep(0.003)
        handles += [
            engine.submit(tokenizer.encode(f"late {i}"), SamplingParams(max_new_tokens=10, seed=i)) for i in range(2)
        ]
        return [fin for _, fin in await asyncio.gather(*(events_of(h) for h in handles))]

    fins = run_with_engine(model, body, start=False, observer=rec, max_batch_size=8)
    assert all(f.reason == "length" for f in fins)
    assert rec.steps[0] >= 4  # queued together, decoded together
    # every token after each request's first one came from a decode step
    assert sum(rec.steps) == sum(f.completion_tokens - 1 for f in fins)


def test_cancel_frees_the_row(model: Transformer) -> None:
    """With one row, a cancelled request must leave it, or the queued one could never run."""
    rec = Recorder(block_first_token=True)

    async def body(engine: Engine) -> tuple[FinishEvent, FinishEvent, int, int]:
        long = engine.submit(PROMPT, SamplingParams(max_new_tokens=10, seed=1))
        queued = engine.submit(tokenizer.encode("next"), SamplingParams(max_new_tokens=3, seed=2))
        assert await asyncio.to_thread(rec.first_token.wait, 10)  # the worker is inside the long request's step
        long.cancel()
        rec.block = False
        rec.release.set()
        _, fin = await events_of(long)
        _, fin2 = await events_of(queued)  # needed the only row
        return fin, fin2, engine.n_running

    fin, fin2, running_end = run_with_engine(model, body, observer=rec, max_batch_size=1)
    assert fin.reason == "abort"
    assert fin.completion_tokens == 1  # cancelled right after its first token
    assert running_end == 0
    assert fin2.reason == "length" and fin2.completion_tokens == 3


class StepHook(EngineObserver):
    """Runs `hook(n)` on the worker after the n-th decode step's tokens (n = 1, 2, ...)."""

    def __init__(self, hook: Callable[[int], None]) -> None:
        self.hook, self.n = hook, 0

    def on_tokens(self, inter_token_s: list[float]) -> None:
        self.n += 1
        self.hook(self.n)


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_row_ends_the_step_it_is_cancelled_or_times_out_in_mid_generation(model: Transformer, how: str) -> None:
    """Rows decoding steadily (no job, no waiting request) are still looked at after every step: a cancel or a
    passed deadline during the 5th decode step ends the request with its 6 tokens, the other row runs on."""
    handles: list[RequestHandle] = []

    def hook(n: int) -> None:
        if n == 5:
            if how == "cancel":
                handles[0].cancel()
            else:
                threading.Event().wait(0.6)  # the worker stalls past the deadline

    async def body(engine: Engine) -> tuple[FinishEvent, FinishEvent]:
        handles.append(engine.submit(PROMPT, SamplingParams(max_new_tokens=20, temperature=0.0)))
        other = SamplingParams(max_new_tokens=20, temperature=0.0)
        handles.append(engine.submit(tokenizer.encode("other"), other))
        engine.start()
        return (await events_of(handles[0]))[1], (await events_of(handles[1]))[1]

    timeout = {"request_timeout_s": 0.5} if how == "timeout" else {}
    fin, fin_other = run_with_engine(model, body, start=False, observer=StepHook(hook), max_batch_size=2, **timeout)
    assert fin.reason == ("abort" if how == "cancel" else "timeout") and fin.completion_tokens == 6
    assert fin_other.completion_tokens == (20 if how == "cancel" else 6)


def test_queue_sizes_are_reported_when_they_change(model: Transformer) -> None:
    """The observer hears the running / waiting counts on each change (not on every step) and ends at (0, 0)."""
    rec = PrefillRecorder()

    async def body(engine: Engine) -> None:
        handles = [engine.submit(PROMPT, SamplingParams(max_new_tokens=20, temperature=0.0)) for _ in range(2)]
        engine.start()
        await asyncio.gather(*(events_of(h) for h in handles))
        await asyncio.sleep(0.05)  # the worker reports after the last reap too

    run_with_engine(model, body, start=False, observer=rec, max_batch_size=1)
    assert rec.layouts[:2] == [(0, 1), (0, 2)]  # the two submits
    # the worker's first look (a submit came since its last report), admit, finish, admit, finish: 40 steps, 5 reports
    assert rec.layouts[2:] == [(0, 2), (1, 1), (0, 1), (1, 0), (0, 0)]


def test_cancel_while_waiting(model: Transformer) -> None:
    async def body(engine: Engine) -> tuple[FinishEvent, int, int]:
        h = engine.submit(PROMPT, SamplingParams(max_new_tokens=5))
        h.cancel()
        engine.start()
        tokens, fin = await events_of(h)
        assert tokens == []
        return fin, engine.n_running, engine.n_waiting

    fin, running, waiting = run_with_engine(model, body, start=False)
    assert fin.reason == "abort" and fin.completion_tokens == 0
    assert running == 0 and waiting == 0


def test_queue_full_raises(model: Transformer) -> None:
    async def body(engine: Engine) -> int:
        engine.submit(PROMPT, SamplingParams(max_new_tokens=2))
        engine.submit(PROMPT, SamplingParams(max_new_tokens=2))
        with pytest.raises(QueueFullError, match="2"):
            engine.submit(PROMPT, SamplingParams(max_new_tokens=2))
        return engine.n_waiting

    assert run_with_engine(model, body, start=False, max_queue=2) == 2


def test_request_timeout(model: Transformer) -> None:
    rec = Recorder(sleep_first_token=0.5)  # the worker stalls past the deadline right after the first token

    async def body(engine: Engine) -> list[FinishEvent]:
        running = engine.submit(PROMPT, SamplingParams(max_new_tokens=20))
        waiting = engine.submit(PROMPT, SamplingParams(max_new_tokens=20))  # max_batch_size=1: never gets a row
        return [(await events_of(h))[1] for h in (running, waiting)]

    fins = run_with_engine(model, body, observer=rec, max_batch_size=1, request_timeout_s=0.3)
    assert [f.reason for f in fins] == ["timeout", "timeout"]
    # (on a machine so loaded that the first prefill came after the deadline, it timed out while waiting)
    assert fins[0].completion_tokens == (1 if rec.first_token.is_set() else 0)
    assert fins[1].completion_tokens == 0 and fins[1].timings["ttft_s"] is None
    assert all("timeout" in (f.error or "") for f in fins)


def test_draining_rejects_new_work_and_finishes_old(model: Transformer) -> None:
    async def body(engine: Engine) -> tuple[list[FinishEvent], bool]:
        handles = [engine.submit(PROMPT, SamplingParams(max_new_tokens=4, seed=i)) for i in range(3)]
        engine.begin_drain()
        assert not engine.accepting
        with pytest.raises(EngineDrainingError):
            engine.submit(PROMPT, SamplingParams(max_new_tokens=4))
        engine.start()
        fins = [(await events_of(h))[1] for h in handles]
        return fins, await engine.wait_idle(5)

    fins, idle = run_with_engine(model, body, start=False, max_batch_size=2)
    assert [f.reason for f in fins] == ["length"] * 3
    assert idle


def test_prompt_too_long_names_both_numbers(model: Transformer) -> None:
    engine = Engine(model)
    prompt = [65] * 30
    engine.validate(prompt, SamplingParams(max_new_tokens=2))  # exactly the window: fine
    with pytest.raises(PromptTooLongError) as info:
        engine.validate(prompt, SamplingParams(max_new_tokens=5))
    msg = str(info.value)
    assert "30" in msg and "5" in msg and "35" in msg and str(WINDOW) in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ([], SamplingParams(), "prompt"),
        ([256], SamplingParams(max_new_tokens=1), "prompt"),
        ([-1], SamplingParams(max_new_tokens=1), "prompt"),
        ([65], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([65], SamplingParams(max_new_tokens=2, temperature=-1.0), "temperature"),
        ([65], SamplingParams(max_new_tokens=2, temperature=float("inf")), "temperature"),
        ([65], SamplingParams(max_new_tokens=2, temperature=float("nan")), "temperature"),
        ([65], SamplingParams(max_new_tokens=2, top_k=-1), "top_k"),
        ([65], SamplingParams(max_new_tokens=2, top_p=0.0), "top_p"),
        ([65], SamplingParams(max_new_tokens=2, top_p=1.5), "top_p"),
        ([65], SamplingParams(max_new_tokens=2, logprobs=21), "logprobs"),
        ([65], SamplingParams(max_new_tokens=2, logprobs=-1), "logprobs"),
        ([65], SamplingParams(max_new_tokens=2, stop=("",)), "stop"),
        ([65], SamplingParams(max_new_tokens=2, stop=("x" * 65,)), "stop"),
        ([65], SamplingParams(max_new_tokens=2, stop=tuple("abcdefghijklmnopq")), "stop"),
        ([65], SamplingParams(max_new_tokens=2, seed=-1), "seed"),
        ([65], SamplingParams(max_new_tokens=2, seed=2**63), "seed"),
        ([65] * 25, SamplingParams(max_new_tokens=11), "max_new_tokens"),  # room left, but not for 11 more
        ([65] * WINDOW, SamplingParams(max_new_tokens=1), "prompt"),  # the prompt alone fills the window
    ],
)
def test_invalid_params_raise(model: Transformer, prompt: list[int], params: SamplingParams, param: str) -> None:
    engine = Engine(model)
    with pytest.raises(InvalidRequestError) as info:
        engine.validate(prompt, params)
    assert info.value.param == param

    async def submit() -> None:
        engine.submit(prompt, params)

    with pytest.raises(InvalidRequestError):
        asyncio.run(submit())
    assert engine.n_waiting == 0


# ---------------------------------------------------------------- jobs


def test_run_job_interleaves_with_generation(model: Transformer) -> None:
    def job(engine: Engine) -> Callable[[Transformer], Generator[None, None, list[int]]]:
        def gen(m: Transformer) -> Generator[None, None, list[int]]:
            seen = []
            for _ in range(5):
                seen.append(engine.steps)
                m(torch.tensor([PROMPT]))
                yield
            return seen

        return gen

    async def body(engine: Engine) -> tuple[list[int], FinishEvent]:
        handle = engine.submit(PROMPT, SamplingParams(max_new_tokens=10, seed=0))
        fut = engine.run_job(job(engine))
        engine.start()
        seen = await asyncio.wait_for(asyncio.wrap_future(fut), 20)
        _, fin = await events_of(handle)
        return seen, fin

    seen, fin = run_with_engine(model, body, start=False)
    assert fin.reason == "length" and fin.completion_tokens == 10
    assert len(seen) == 5
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False))  # decode steps ran between the job's slices


def test_run_job_error_reaches_the_future(model: Transformer) -> None:
    def bad(m: Transformer) -> Generator[None, None, None]:
        yield
        raise ValueError("boom")

    async def body(engine: Engine) -> None:
        with pytest.raises(ValueError, match="boom"):
            await asyncio.wait_for(asyncio.wrap_future(engine.run_job(bad)), 20)
        _, fin = await events_of(engine.submit(PROMPT, SamplingParams(max_new_tokens=2)))
        assert fin.reason == "length"  # the worker survived

    run_with_engine(model, body)


# ---------------------------------------------------------------- sample_rows


def _logits(b: int = 6, v: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3  # (B, V)


def _gens(b: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(b)]


def _full(b: int, value: float) -> torch.Tensor:
    return torch.full((b,), value)


def test_sample_rows_greedy_cases() -> None:
    logits = _logits()
    B = logits.shape[0]
    greedy = logits.argmax(-1)
    zeros_k = torch.zeros(B, dtype=torch.long)
    assert torch.equal(
        sample_rows(logits, _full(B, 2.0), torch.ones(B, dtype=torch.long), _full(B, 1.0), _gens(B)), greedy
    )
    assert torch.equal(sample_rows(logits, _full(B, 2.0), zeros_k, _full(B, 1e-6), _gens(B)), greedy)
    gens = _gens(B)
    states = [g.get_state() for g in gens]
    assert torch.equal(sample_rows(logits, _full(B, 0.0), zeros_k, _full(B, 1.0), gens), greedy)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states, strict=True))  # greedy draws nothing


def test_sample_rows_top_k_2_only_picks_the_two_best() -> None:
    n = 2000
    logits = _logits(1, seed=3).expand(n, -1)  # (n, V)
    top2 = set(logits[0].topk(2).indices.tolist())
    out = sample_rows(logits, _full(n, 5.0), torch.full((n,), 2), _full(n, 1.0), _gens(n))
    assert set(out.tolist()) == top2


def test_sample_rows_matches_the_distribution() -> None:
    n = 2000
    base = torch.full((256,), -30.0)
    base[[10, 20, 30]] = torch.tensor([2.0, 1.0, 0.0])
    logits = base.expand(n, -1)  # (n, V)
    probs = torch.softmax(base, -1)[[10, 20, 30]]
    out = sample_rows(logits, _full(n, 1.0), torch.zeros(n, dtype=torch.long), _full(n, 1.0), _gens(n, seed=11))
    freq = torch.tensor([(out == t).float().mean().item() for t in (10, 20, 30)])
    torch.testing.assert_close(freq, probs, atol=0.04, rtol=0)
    # nucleus just above p(10): token 20 starts inside the mass (kept), token 30 starts beyond it (cut)
    p10 = float(probs[0])
    nucleus = sample_rows(logits, _full(n, 1.0), torch.zeros(n, dtype=torch.long), _full(n, p10 + 0.01), _gens(n))
    assert set(nucleus.tolist()) == {10, 20}
    share = (nucleus == 10).float().mean().item()
    assert abs(share - p10 / float(probs[0] + probs[1])) < 0.04


def test_sample_rows_row_independent_of_batch() -> None:
    logits = _logits(5, seed=4)
    temp = torch.tensor([1.0, 0.0, 0.7, 1.5, 1.0])
    top_k = torch.tensor([0, 0, 5, 0, 50])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0])
    batch = sample_rows(logits, temp, top_k, top_p, _gens(5, seed=100))
    gens = _gens(5, seed=100)
    alone = [
        int(sample_rows(logits[i : i + 1], temp[i : i + 1], top_k[i : i + 1], top_p[i : i + 1], [gens[i]]))
        for i in range(5)
    ]
    assert batch.tolist() == alone
