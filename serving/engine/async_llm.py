"""The engine for the HTTP server: a background step loop and one output stream per request.

The step loop runs in its own thread, never on the event loop. It owns the `LLMEngine`:
the event loop only tokenizes/validates (`process_request`, read-only) and hands commands
(add, abort) to the thread. A grammar is compiled before that, on a worker thread (a large JSON
Schema takes seconds; xgrammar releases the GIL), into the cache `process_request` reads; the
rest stays on the event loop, so requests are numbered and queued in one order. Outputs travel
back through a per-request `asyncio.Queue` filled with `loop.call_soon_threadsafe`. When there
is no work the thread sleeps on a condition variable.
"""

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.engine.llm_engine import LLMEngine, UserRequest
from kvpilot.serving.engine.outputs import RequestOutput
from kvpilot.serving.engine.stats import EngineStats
from kvpilot.serving.sampling_params import SamplingParams
from kvpilot.serving.validation import InvalidParameter


class EngineDeadError(RuntimeError):
    """The step loop failed (or was shut down); the engine accepts no more requests."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        _call_soon(self.loop, self.queue.put_nowait, item)


class AsyncLLM:
    """`AsyncLLM(config)` loads the model (blocking); `await start()` starts the step loop."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.engine = LLMEngine(config)
        runner = self.engine.model_runner
        self.tokenizer = self.engine.tokenizer
        self.chat_template = self.engine.chat_template
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.vocab_size
        self.eos_token_ids = self.engine.eos_token_ids
        self.weight_bytes = runner.weight_bytes
        self.dtype = runner.dtype_name  # --dtype auto resolved
        self.kv_cache_plan = runner.kv_cache_plan
        self._cond = threading.Condition()
        self._adds: list[UserRequest] = []  # guarded by _cond, applied by the step loop
        self._aborts: list[tuple[str, asyncio.Future | None, asyncio.AbstractEventLoop | None]] = []
        self._streams: dict[str, _Stream] = {}  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop_exited = False  # guarded by _cond: no abort can be queued after this
        self.error: BaseException | None = None  # why the step loop died, if it did

    # Lifecycle

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kvpilot-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the step loop; requests still streaming end with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._fail_all(EngineDeadError("the engine was shut down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # Requests

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; the last has finished=True. If the caller stops
        iterating early (break, cancellation, client disconnect) the request is aborted."""
        self._check_running()
        arrival = time.monotonic()
        if params is not None and params.structured_outputs is not None:
            await asyncio.to_thread(self.engine.compile_grammar, params)  # InvalidParameter if it cannot
        user = self.engine.process_request(request_id, prompt, params, arrival)  # ValueError on bad input
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cond:
            # Again, under the lock the loop fails streams under: it may have died meanwhile (the
            # grammar compile above takes seconds), and a stream added after that is never served.
            self._check_running()
            if request_id in self._streams:
                raise InvalidParameter("request_id", f"{request_id!r} is already in the engine")
            self._streams[request_id] = stream
            self._adds.append(user)
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                with self._cond:
                    self._streams.pop(request_id, None)  # nobody reads it any more
                self._request_abort(request_id, None, None)

    def _check_running(self) -> None:
        if self._loop_exited or not self.is_running:
            reason = f"the step loop failed: {self.error!r}" if self.error else "never started or shut down"
            raise EngineDeadError(f"the engine is not running: {reason}") from self.error

    async def abort(self, request_id: str) -> None:
        """Abort a request and return once its blocks are free (its stream ends with finish_reason
        "abort"). Unknown or finished ids are ignored."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._request_abort(request_id, done, loop)
        await done

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a batch slot: the scheduler's and those not handed to it yet."""
        return self.engine.num_waiting + sum(len(user.sequences) for user in self._adds)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    # The step loop (engine thread)

    def _request_abort(self, request_id: str, done, loop) -> None:
        with self._cond:
            if self._loop_exited or self._thread is None:
                if done is not None:
                    done.set_result(None)
                return
            self._aborts.append((request_id, done, loop))
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._adds or self._aborts or self._stopping or self.engine.has_unfinished()):
                        self._cond.wait()
                    if self._stopping:
                        return
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                for user in adds:
                    self._add(user)
                for request_id, done, loop in aborts:
                    self._deliver(self.engine.abort_request(request_id))
                    if done is not None:
                        _call_soon(loop, _resolve, done)
                self._deliver(self.engine.step())
        except BaseException as exc:  # the engine is broken: every waiting stream must hear about it
            self.error = exc
            self._fail_all(EngineDeadError(f"engine step failed: {exc!r}"))
        finally:
            self._resolve_aborts()

    def _add(self, user: UserRequest) -> None:
        with self._cond:
            stream = self._streams.get(user.request_id)
        try:
            self.engine.add_processed_request(user)
        except ValueError as exc:
            with self._cond:
                self._streams.pop(user.request_id, None)
            if stream is not None:
                stream.put(exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._cond:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if output.finished:
                    self._streams.pop(output.request_id, None)
                if stream is not None:
                    stream.put(output)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            streams, self._streams = self._streams, {}
            self._adds.clear()
        for stream in streams.values():
            stream.put(error)

    def _resolve_aborts(self) -> None:
        with self._cond:
            self._loop_exited = True
            aborts, self._aborts = self._aborts, []
        for _, done, loop in aborts:
            if done is not None:
                _call_soon(loop, _resolve, done)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Hand a callback to a consumer's event loop; a loop that has closed meanwhile is skipped."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)
