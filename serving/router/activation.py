"""Scale from zero: requests for a model with no ready endpoint wait here, in arrival order.

The queue is bounded (`activation.maxQueued` per model, and `max_bytes` of request bodies over
all models, so that held requests cannot take the router past its memory limit: beyond either,
429) and each wait is bounded (`activation.timeout`: then 503). `release(model)` wakes the
waiters oldest first when an endpoint becomes ready; each woken request looks for its endpoint
again and, if there is still none (all taken by weight 0, or it went away), waits again at the
front.
"""

import asyncio
import collections

MEMORY_SHARE = 4  # the bodies held may take a quarter of the router's memory (the operator passes it)
DEFAULT_MAX_BYTES = (512 << 20) // MEMORY_SHARE  # of the chart's default 512Mi limit


class QueueFull(Exception):
    pass


class ActivationQueue:
    def __init__(self, on_change=None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.waiting: dict[str, collections.deque[asyncio.Future]] = collections.defaultdict(
            collections.deque
        )
        self.on_change = on_change  # called with (model, number held) whenever it changes
        self.max_bytes = max_bytes
        self.bytes_held = 0

    def held(self, model: str) -> int:
        return len(self.waiting.get(model, ()))

    async def wait(
        self, model: str, timeout: float, max_queued: int, front: bool = False, size: int = 0
    ) -> bool:
        """Hold a request of `size` bytes until released (True) or `timeout` seconds passed
        (False); QueueFull when the model's queue or the bytes held are at their bound."""
        queue = self.waiting[model]
        if len(queue) >= max_queued:
            raise QueueFull(f"{max_queued} requests are already waiting")
        if self.bytes_held + size > self.max_bytes:
            raise QueueFull(
                f"the requests waiting hold {self.bytes_held} of the router's {self.max_bytes} bytes"
            )
        future = asyncio.get_running_loop().create_future()
        queue.appendleft(future) if front else queue.append(future)
        self.bytes_held += size
        self._changed(model)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if future in queue:
                queue.remove(future)
            future.cancel()
            self.bytes_held -= size
            self._changed(model)

    def release(self, model: str) -> None:
        """Wake every waiter of `model`, oldest first (they resume in that order)."""
        for future in self.waiting.get(model, ()):
            if not future.done():
                future.set_result(None)

    def _changed(self, model: str) -> None:
        if self.on_change is not None:
            self.on_change(model, self.held(model))
