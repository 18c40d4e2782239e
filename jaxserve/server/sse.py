"""Server-sent events and client disconnects: the SSE response that stops the moment a client
leaves, the guard that cancels a non-streaming request whose client left, and the merge of a
request's per-prompt streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from jaxserve.server.errors import APIError, safe_dumps, sse_error_event

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was complete."""


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several streams as (stream index, item); one stream is passed through without
    a task so that cancellation reaches it directly. Leaving early cancels every producer."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as s:
            async for item in s:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(i: int, s: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(s):
                async for item in s:
                    await queue.put((i, item, None))
            await queue.put((i, done, None))
        except Exception as e:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(drain(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, err = await queue.get()
            if err is not None:
                raise err
            if item is done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_disconnect(receive) -> None:
    """Returns when the ASGI server reports that the client closed the connection."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(awaitable: Awaitable[T], receive) -> T:
    """Await `awaitable` unless the client leaves first; then cancel it (its cleanup aborts the
    engine request) and raise ClientDisconnected. Guards non-streaming requests, whose
    generation would otherwise run to the end for nobody."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, watch):
            if not t.done():
                t.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    if work.done() and not work.cancelled():
        return work.result()
    await asyncio.gather(work, return_exceptions=True)  # let its cleanup (abort) finish
    raise ClientDisconnected()


class SSEStream:
    """An ASGI response streaming `events` (already `data: ...\\n\\n` strings) that stops as
    soon as the client disconnects, even while no event is being produced (long prefill,
    queueing): a watcher on `receive` cancels the producer, whose cleanup aborts the request."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None] | None = None):
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})  # nginx: do not buffer the stream
        try:
            await until_disconnect(self._pump(send), receive)
        except ClientDisconnected:
            pass  # the producer was cancelled; its cleanup aborted the request
        finally:
            if self._on_close is not None:
                self._on_close()

    async def _pump(self, send) -> None:
        try:
            async with contextlib.aclosing(self._events) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event.encode(),
                                "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # uvicorn's ClientDisconnected: nobody left to write to
            log.debug("client disconnected while streaming")


async def sse_events(chunks: AsyncIterator[dict], merged: AsyncIterator[Any]) -> AsyncIterator[str]:
    """dict chunks -> SSE events; a failure after the headers is an error event, and every
    stream ends with `data: [DONE]`."""
    try:
        try:
            async for chunk in chunks:
                yield f"data: {safe_dumps(chunk)}\n\n"
        except APIError as e:
            yield sse_error_event(e)
        except Exception as e:  # noqa: BLE001 - an engine fault mid-stream, reported in-band
            log.exception("stream failed")
            yield sse_error_event(APIError(
                500, f"Internal error while generating: {type(e).__name__}: {e}"))
        yield "data: [DONE]\n\n"
    finally:
        for it in (chunks, merged):
            with contextlib.suppress(Exception):
                await it.aclose()
