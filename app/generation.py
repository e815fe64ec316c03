"""Glue between HTTP requests and the engine: submit, wait (watching for disconnects), stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from fastapi import Request

from app.errors import APIError, engine_error
from app.service import ServedModel
from model import tokenizer
from model.engine import EngineError, FinishEvent, RequestHandle, SamplingParams, TokenEvent


def stop_tuple(stop: str | list[str] | None) -> tuple[str, ...]:
    """Normalise the `stop` field."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def default_max_new(served: ServedModel, prompt_len: int, default: int) -> int:
    """max_new_tokens when the client gave none: the setting, capped by what the window leaves (at least 1)."""
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


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, handle: RequestHandle) -> tuple[list[TokenEvent], FinishEvent]:
    """Wait for the whole result; if the client goes away first, cancel the sequence."""
    result = asyncio.ensure_future(handle.result())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done():  # the client left first: 499 in the log and metrics (nobody reads the answer)
            handle.cancel()
            raise APIError(499, "client closed the request", code="client_closed_request")
        return await result
    finally:
        gone.cancel()
        if not result.done():
            handle.cancel()
            result.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gone


def finish_error(fin: FinishEvent) -> APIError | None:
    """The API error for a finish that is not a normal completion."""
    if fin.reason == "timeout":
        return APIError(504, fin.error or "request timed out", code="request_timeout")
    if fin.reason == "error":
        return APIError(500, fin.error or "generation failed", code="engine_error")
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
