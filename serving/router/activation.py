"""Scale from zero: requests for a model with no ready endpoint wait here, in arrival order.

The queue is bounded (`activation.maxQueued`: beyond it, 429) and each wait is bounded
(`activation.timeout`: then 503). `release(model)` wakes the waiters oldest first when an
endpoint becomes ready; each woken request looks for its endpoint again and, if there is still
none (all taken by weight 0, or it went away), waits again at the front.
"""

import asyncio
import collections


class QueueFull(Exception):
    pass


class ActivationQueue:
    def __init__(self, on_change=None):
        self.waiting: dict[str, collections.deque[asyncio.Future]] = collections.defaultdict(
            collections.deque
        )
        self.on_change = on_change  # called with (model, number held) whenever it changes

    def held(self, model: str) -> int:
        return len(self.waiting.get(model, ()))

    async def wait(self, model: str, timeout: float, max_queued: int, front: bool = False) -> bool:
        """Hold until released (True) or `timeout` seconds passed (False); QueueFull when full."""
        queue = self.waiting[model]
        if len(queue) >= max_queued:
            raise QueueFull(model)
        future = asyncio.get_running_loop().create_future()
        queue.appendleft(future) if front else queue.append(future)
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
            self._changed(model)

    def release(self, model: str) -> None:
        """Wake every waiter of `model`, oldest first (they resume in that order)."""
        for future in self.waiting.get(model, ()):
            if not future.done():
                future.set_result(None)

    def _changed(self, model: str) -> None:
        if self.on_change is not None:
            self.on_change(model, self.held(model))
