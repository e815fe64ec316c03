"""Glue between HTTP requests and the engine: submit, wait (watching for disconnects), stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterable, Mapping
from typing import Any

import anyio
from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from app.errors import APIError, engine_error
from app.service import ServedModel
from model import tokenizer
from model.engine import EngineDrainingError, EngineError, FinishEvent, RequestHandle, SamplingParams, TokenEvent
from model.transformer import Transformer

Job = Callable[[Transformer], Generator[None, None, Any]]

# The answer's cost model: an upper bound of its JSON bytes, from what the request asks before anything runs
# (measured on /generate and /v1, JSON and SSE, with the widest values; docs in SECURITY.md, "Answer size").
ANSWER_FIXED_BYTES = 4096  # the fields around the choices
TOKEN_BYTES = 320  # one token's text and fields, or one streamed chunk's head
LOGPROB_BYTES = 64  # one (token, logprob) entry: the sampled token's and each top one
TRACE_LAYER_BYTES = 50  # one layer of a token's trace: resid_norm and update_ratio
LENS_ENTRY_BYTES = 64  # one logit-lens entry of one layer: {"id", "text", "prob"}
OFF_LOOP_BYTES = 256 * 1024  # answers estimated larger are built and serialised on a worker thread


def answer_bytes(rows: Iterable[tuple[SamplingParams, int]], n_layer: int, repeat: int = 1) -> int:
    """The estimated size of an answer of `rows` (each: its parameters and how many prompt tokens it echoes with
    their logprobs); `repeat` 2 where a stream repeats every token in its last event (/generate)."""
    total = 0
    for params, echoed in rows:
        k = params.logprobs
        per_token = TOKEN_BYTES + (LOGPROB_BYTES * (k + 1) if k else 0)
        per_new = per_token
        if params.traced:
            per_new += n_layer * (TRACE_LAYER_BYTES + LENS_ENTRY_BYTES * params.logit_lens_top)
        total += params.max_new_tokens * per_new + echoed * per_token
    return ANSWER_FIXED_BYTES + repeat * total


def check_answer_size(
    request: Request,
    served: ServedModel,
    rows: list[tuple[SamplingParams, int]],
    repeat: int = 1,
    extra: int = 0,
) -> int:
    """The answer's estimated size (`answer_bytes`, plus `extra`: e.g. the encoded hidden states); a 413 naming
    SHORTCUT_MAX_ANSWER_BYTES when it is over, and a 400 when the request has more rows than the queue can ever hold
    (SHORTCUT_MAX_QUEUE)."""
    settings = request.app.state.settings
    if len(rows) > served.engine.max_queue:
        raise APIError(
            400,
            f"this request needs {len(rows)} sequences (prompts x n) but the server queues at most "
            f"{served.engine.max_queue} (SHORTCUT_MAX_QUEUE): it can never be served; send fewer prompts or a "
            "smaller n",
            code="request_too_large",
        )
    size = answer_bytes(rows, served.checkpoint.config.n_layer, repeat) + repeat * extra
    if size > settings.max_answer_bytes:
        raise APIError(
            413,
            f"the answer could be up to {size} bytes ({len(rows)} sequences of up to "
            f"{max(p.max_new_tokens for p, _ in rows)} tokens), over the server's SHORTCUT_MAX_ANSWER_BYTES "
            f"({settings.max_answer_bytes}); lower max_tokens, n, the number of prompts, logprobs or "
            "logit_lens_top, or leave out trace",
            code="answer_too_large",
        )
    return size


async def json_answer(build: Callable[[], Any], size: int) -> Any:
    """`build()` (a response model) as it is, or, when its estimated `size` is over OFF_LOOP_BYTES, built and
    serialised on a worker thread (the event loop keeps serving) as a finished JSON response."""
    if size <= OFF_LOOP_BYTES:
        return build()
    return await anyio.to_thread.run_sync(lambda: JSONResponse(jsonable_encoder(build())))


def default_max_new(served: ServedModel, prompt_len: int, default: int) -> int:
    """max_new_tokens when the client gave none: `default`, capped by what the window leaves (at least 1)."""
    return max(1, min(default, served.checkpoint.config.block_size - prompt_len))


def submit(
    served: ServedModel, prompt: str, params: SamplingParams, names: Mapping[str, str] | None = None
) -> tuple[RequestHandle, int]:
    """Tokenize and queue; map engine refusals to API errors (fields renamed by `names`). Returns the handle and
    the prompt length."""
    ids = tokenizer.encode(prompt)
    try:
        return served.engine.submit(ids, params), len(ids)
    except EngineError as e:
        raise engine_error(e, names) from None


async def wait_disconnect(request: Request) -> None:
    """Return once the client has gone away (the request's `http.disconnect`)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, handles: list[RequestHandle]) -> list[tuple[list[TokenEvent], FinishEvent]]:
    """Every request's whole result; a client that goes away first cancels them all (a 499). A request that did
    not finish normally raises its API error."""
    results = asyncio.ensure_future(asyncio.gather(*(h.result() for h in handles)))
    results.add_done_callback(_retrieve)  # a cancelled gather holds a CancelledError nobody else would retrieve
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        waiting: set[asyncio.Future[Any]] = {results, gone}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not results.done():  # the client left first: 499 in the log and metrics (nobody reads the answer)
            for h in handles:
                h.cancel()
            raise APIError(499, "client closed the request", code="client_closed_request")
        out = await results
    finally:
        gone.cancel()
        if not results.done():
            for h in handles:
                h.cancel()
            results.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gone
    for _, fin in out:
        if (err := finish_error(fin)) is not None:
            raise err
    return out


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def finish_error(fin: FinishEvent) -> APIError | None:
    """The API error for a finish that is not a normal completion."""
    if fin.reason == "timeout":
        return APIError(504, fin.error or "request timed out", code="request_timeout")
    if fin.reason == "error":
        return APIError(500, fin.error or "generation failed", code="engine_error")
    if fin.reason == "overflow":  # the client stopped reading (SHORTCUT_MAX_PENDING_EVENTS)
        return APIError(499, fin.error or "client read too slowly", code="client_too_slow")
    if fin.reason == "abort":  # a client's own cancel never reaches it: the server is shutting down
        return APIError(503, fin.error or "server is shutting down", code="draining")
    return None


async def stream_events(handle: RequestHandle) -> AsyncIterator[TokenEvent | FinishEvent]:
    """Yield the request's events; cancel the sequence if the consumer stops early (client disconnect)."""
    finished = False
    try:
        async for ev in handle:
            if isinstance(ev, FinishEvent):
                finished = True
            yield ev
    finally:
        if not finished:
            handle.cancel()


async def merged_events(handles: list[RequestHandle]) -> AsyncGenerator[tuple[int, TokenEvent | FinishEvent]]:
    """(index, event) pairs of all requests as they come; leaving early cancels every request. The queue between
    holds a few events only: a consumer that stops reading leaves them on the requests' own (bounded) queues."""
    queue: asyncio.Queue[tuple[int, TokenEvent | FinishEvent]] = asyncio.Queue(maxsize=len(handles))

    async def pump(i: int, handle: RequestHandle) -> None:
        async for ev in handle:
            await queue.put((i, ev))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    finished = 0
    try:
        while finished < len(handles):
            i, ev = await queue.get()
            finished += isinstance(ev, FinishEvent)
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        if finished < len(handles):
            for h in handles:
                h.cancel()


async def run_job(request: Request, served: ServedModel, job: Job, what: str) -> Any:
    """Run `job` on the served model's engine worker between decode steps (`Engine.run_job`: its share of the worker)
    and return its result. The queue of jobs is capped (429); past the request timeout (504) or when the client
    disconnects (499) the job is cancelled, and the engine drops it before its next slice. A ValueError from the job
    is the request's fault (400); draining is a 503. `what` names the job in the messages."""
    engine = served.engine
    settings = request.app.state.settings
    if engine.n_jobs >= max(1, settings.max_queue):
        raise APIError(
            429, f"too many jobs queued ({what} among them)", code="queue_full", headers={"Retry-After": "1"}
        )
    try:
        fut = engine.run_job(job)
    except EngineDrainingError as e:
        raise APIError(503, str(e), code="draining") from None
    result = asyncio.wrap_future(fut)
    gone = asyncio.ensure_future(wait_disconnect(request))
    timeout_s = settings.request_timeout_s
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if result in done:
            try:
                return result.result()
            except EngineDrainingError as e:
                raise APIError(503, str(e), code="draining") from None
            except ValueError as e:
                raise APIError(400, str(e), code="invalid_value") from None
        if gone in done:
            raise APIError(499, "client closed the request", code="client_closed_request")
        raise APIError(504, f"{what} ran past the request timeout ({timeout_s:g} s)", code="request_timeout")
    finally:
        fut.cancel()
        result.cancel()
        gone.cancel()
