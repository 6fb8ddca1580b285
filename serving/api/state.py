"""What the app keeps on `app.state.serving`: the engine, readiness, in-flight requests, drain."""

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from kvpilot.serving.api.errors import APIError, bad_request, unavailable
from kvpilot.serving.api.metrics import RequestObserver, ServerMetrics
from kvpilot.serving.api.prompts import ModelInfo, max_prompt_chars
from kvpilot.serving.api.settings import ServeSettings
from kvpilot.serving.api.token_bytes import TokenBytes
from kvpilot.serving.engine.outputs import RequestOutput
from kvpilot.serving.sampling_params import SamplingParams
from kvpilot.serving.validation import InvalidParameter

logger = logging.getLogger("kvpilot.serving.api")

RETRY_AFTER_SECONDS = 1
T = TypeVar("T")


class ServingState:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.model_name = settings.model_name
        self.metrics = ServerMetrics(self.model_name)
        self.engine = None  # AsyncLLM, once loaded
        self.model_info: ModelInfo | None = None
        self.ready = False  # loaded, warmed up and not draining
        self.draining = False
        self.load_error: BaseException | None = None
        self.num_accepted = 0  # HTTP requests past the gate whose responses have not completed
        self.engine_request_ids: set[str] = set()  # engine requests still producing output
        # Tokenizing, chat templates and prompt decoding: never on the event loop (a long prompt
        # would stall every other request); the tokenizer releases the GIL while it encodes.
        self.text_workers = ThreadPoolExecutor(max(4, os.cpu_count() or 1), thread_name_prefix="kvpilot-text")

    # Start-up

    async def load(self) -> None:
        """Load the model (in a thread, the event loop keeps answering /health), warm up, turn ready."""
        from kvpilot.serving.engine.async_llm import AsyncLLM

        config = self.settings.engine_config()
        logger.info(
            "loading model %s (dtype %s, quantization %s)", config.model, config.dtype, config.quantization
        )
        started = time.monotonic()
        try:
            engine = await asyncio.to_thread(AsyncLLM, config)
            await engine.start()
        except Exception as exc:
            self.load_error = exc
            logger.error("cannot load the model: %s", exc)
            raise
        self.engine = engine
        stats = engine.get_stats()
        # a request must fit the model's context and, alone, the KV pool
        max_model_len = min(engine.max_model_len, stats.num_kv_blocks * stats.block_size)
        self.model_info = ModelInfo(
            engine.tokenizer,
            engine.chat_template,
            max_model_len,
            engine.vocab_size,
            await asyncio.to_thread(max_prompt_chars, engine.tokenizer, max_model_len),
            await asyncio.to_thread(TokenBytes, engine.tokenizer) if engine.tokenizer is not None else None,
        )
        plan = engine.kv_cache_plan
        self.metrics.attach_engine(
            engine.get_stats,
            engine.weight_bytes,
            {
                "cache_dtype": config.kv_cache_dtype,
                "gpu_memory_utilization": str(config.gpu_memory_utilization),
                "num_gpu_blocks_reason": plan.reason,
            },
        )
        logger.info(
            "model loaded in %.1f s: dtype %s, %.1f MiB of weights, max_model_len %d, "
            "%d KV blocks of %d tokens (%s)",
            time.monotonic() - started,
            engine.dtype,
            engine.weight_bytes / 2**20,
            engine.max_model_len,
            stats.num_kv_blocks,
            stats.block_size,
            plan.reason,
        )
        await self._warm_up()
        if not self.draining:
            self.ready = True
            logger.info("warm-up done; serving %s", self.model_name)

    async def _warm_up(self) -> None:
        tokenizer = self.engine.tokenizer
        prompt = tokenizer.encode("Hello") if tokenizer is not None else [0]
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        async for _ in self.engine.generate(prompt, params, "warmup"):
            pass

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()
        self.text_workers.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, function: Callable[..., T], *args) -> T:
        """`function(*args)` on a text worker thread (tokenizing, templates, decoding)."""
        return await asyncio.get_running_loop().run_in_executor(self.text_workers, function, *args)

    # Admission

    def check_ready(self) -> None:
        if self.draining:
            raise unavailable("the server is shutting down", code="server_draining")
        if not self.ready:
            raise unavailable("the model is still loading", code="server_not_ready")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    def check_queue(self, num_sequences: int, param: str) -> None:
        """Admit a request only if the `num_sequences` it adds (prompts x n: each waits for its
        own batch slot) keep the waiting queue within --max-queue-len. One that alone has more
        can never be admitted: 400 naming `param` (a 429 would have clients retry it forever)."""
        max_queue_len = self.settings.max_queue_len
        if num_sequences > max_queue_len:
            raise bad_request(
                f"{param}: the request adds {num_sequences} sequences (prompts x n) to the waiting "
                f"queue, more than it holds (--max-queue-len {max_queue_len})",
                param=param,
            )
        waiting = self.engine.num_waiting
        if waiting + num_sequences > max_queue_len:
            raise APIError(
                429,
                f"the waiting queue is full ({waiting} sequences waiting, {num_sequences} more asked, "
                f"--max-queue-len {max_queue_len}); retry after {RETRY_AFTER_SECONDS} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )

    # Requests

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The engine's output stream, tracked for drain and metrics. A consumer that stops early
        (disconnect, cancellation) aborts the request: `AsyncLLM.generate` does so when closed."""
        from kvpilot.serving.engine.async_llm import EngineDeadError

        observer = RequestObserver(self.metrics)
        self.engine_request_ids.add(request_id)
        rejected = False
        try:
            async with contextlib.aclosing(
                self.engine.generate(prompt_token_ids, params, request_id)
            ) as stream:
                async for output in stream:
                    observer.on_output(output)
                    yield output
        except InvalidParameter as exc:  # the engine's input processing validates every request
            rejected = True
            raise bad_request(str(exc), param=exc.param, code=exc.code) from None
        except EngineDeadError as exc:
            rejected = True
            raise unavailable(f"the engine is not running: {exc}", code="engine_dead") from None
        finally:
            self.engine_request_ids.discard(request_id)
            if not observer.finished and not rejected:  # the consumer left early: the engine aborted it
                observer.on_aborted(params.n)

    # Shutdown

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let accepted requests finish for up to `timeout` s, then abort the rest."""
        self.draining = True
        self.ready = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        logger.info("draining: %d requests in flight, up to %.0f s", self.num_accepted, timeout)
        while self.num_accepted and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.engine_request_ids and self.engine is not None:
            logger.warning("shutdown timeout: aborting %d requests", len(self.engine_request_ids))
            await asyncio.gather(
                *(self.engine.abort(request_id) for request_id in list(self.engine_request_ids))
            )
        # Aborted requests end with an error chunk; give their responses a moment to go out.
        grace = loop.time() + 5.0
        while self.num_accepted and loop.time() < grace:
            await asyncio.sleep(0.05)
        logger.info("drained")
