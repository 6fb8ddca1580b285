"""Async plumbing shared by the endpoints: merging engine streams, cancelling on client disconnect."""

import asyncio
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request, Response
from starlette.types import Receive

_END = object()


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(stream index, item) from several streams as items arrive; closing the merge closes them all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await stream.aclose()
            queue.put_nowait((index, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (the request body must already have been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """Run a handler; if the client goes away first, cancel it (which aborts its engine requests).

    Once a StreamingResponse is returned, Starlette itself watches for the disconnect.
    """
    handler_task = asyncio.ensure_future(handler)
    disconnect_task = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({handler_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (handler_task, disconnect_task):
            if not task.done():
                task.cancel()
        await asyncio.gather(disconnect_task, return_exceptions=True)
    if handler_task.cancelled() or not handler_task.done():
        await asyncio.gather(handler_task, return_exceptions=True)  # let its cleanup (aborts) run
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    return handler_task.result()


class DeltaTracker:
    """What each choice of a stream has already been sent, so every chunk carries only the new part."""

    def __init__(self) -> None:
        self.text_sent: dict[int, int] = {}
        self.tokens_sent: dict[int, int] = {}
        self.finished: set[int] = set()

    def delta(self, choice: int, output) -> tuple[str, slice] | None:
        """(new text, slice of new tokens) for a `CompletionOutput`, or None when nothing is new."""
        text_start = self.text_sent.get(choice, 0)
        token_start = self.tokens_sent.get(choice, 0)
        new_text = output.text[text_start:]
        new_tokens = slice(token_start, len(output.token_ids))
        is_finish = output.finish_reason is not None and choice not in self.finished
        if not new_text and new_tokens.start == new_tokens.stop and not is_finish:
            return None
        self.text_sent[choice] = max(text_start, len(output.text))
        self.tokens_sent[choice] = len(output.token_ids)
        if is_finish:
            self.finished.add(choice)
        return new_text, new_tokens
