"""Continuous batching in the vLLM V1 style: one token budget per step, no prefill/decode phases.

Every request has `num_tokens` (prompt + output) and `num_computed_tokens`; each step the
scheduler gives out up to `max_num_batched_tokens` tokens to close that gap, running requests
first (oldest first: decodes and unfinished prefill chunks), then waiting requests (after their
prefix-cache hits). A prompt longer than the remaining budget is simply chunked. When the block
pool runs dry, the latest-arrived running request is preempted: its blocks are freed and it
recomputes everything later (its tokens are kept, and often its prefix is still cached).

Plain Python: never touches torch.
"""

import bisect
import time
from collections import deque
from collections.abc import Iterable

from kvpilot.serving.engine.kv_cache_manager import KVCacheManager
from kvpilot.serving.engine.request import Request, RequestStatus
from kvpilot.serving.engine.scheduler_output import ScheduledChunk, SchedulerOutput


class Scheduler:
    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # kept in arrival order: the last one is preempted first
        # Monotonic counters (EngineStats):
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        token_budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted_any = False

        index = 0
        while index < len(self.running) and token_budget > 0:
            request = self.running[index]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, token_budget)
            while self.kv_cache_manager.allocate_slots(request, num_new_tokens) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted_any = True
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break
            scheduled.append((request, num_new_tokens))
            token_budget -= num_new_tokens
            index += 1

        # A step that had to preempt admits nobody new: the pool is under pressure.
        while (
            self.waiting and not preempted_any and token_budget > 0 and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting[0]
            # Prompt logprobs need the prefill's logits: a request that asks recomputes its prefix.
            hits, num_hit_tokens = (
                ([], 0)
                if request.needs_prompt_logprobs
                else self.kv_cache_manager.get_computed_blocks(request)
            )
            num_new_tokens = min(request.num_tokens - num_hit_tokens, token_budget)
            if self.kv_cache_manager.allocate_slots(request, num_new_tokens, hits) is None:
                break
            self.waiting.popleft()
            if self.kv_cache_manager.enable_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_hit_tokens
            if request.times.first_scheduled is None:
                request.times.first_scheduled = time.monotonic()
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.arrival_seq)
            scheduled.append((request, num_new_tokens))
            token_budget -= num_new_tokens

        chunks = []
        for request, num_new_tokens in scheduled:
            start = request.num_computed_tokens
            end = start + num_new_tokens
            chunks.append(
                ScheduledChunk(
                    request_id=request.request_id,
                    token_ids=request.token_ids_slice(start, end),
                    num_computed_tokens=start,
                    block_table=self.kv_cache_manager.get_block_ids(request.request_id),
                    sample=end == request.num_tokens,
                    prompt_logprobs=request.needs_prompt_logprobs,
                )
            )
            request.num_computed_tokens = end
        return SchedulerOutput(chunks=chunks, num_batched_tokens=self.max_num_batched_tokens - token_budget)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: list[int]
    ) -> list[Request]:
        """Append one sampled token per sampling chunk (in chunk order), apply the stop rules and
        free finished requests. Returns the requests that received a token."""
        sample_chunks = [chunk for chunk in scheduler_output.chunks if chunk.sample]
        if len(sample_chunks) != len(sampled_token_ids):
            raise ValueError(f"got {len(sampled_token_ids)} sampled tokens for {len(sample_chunks)} chunks")
        updated = []
        now = time.monotonic()
        for chunk, token_id in zip(sample_chunks, sampled_token_ids, strict=True):
            request = self.requests.get(chunk.request_id)
            if request is None or request.is_finished:
                continue  # aborted while its step ran
            if request.num_output_tokens == 0:
                self.prompt_tokens += request.num_prompt_tokens
                request.times.first_token = now
            request.output_token_ids.append(token_id)
            request.times.last_token = now
            self.generation_tokens += 1
            updated.append(request)
            reason = self._check_stop(request)
            if reason is not None:
                self.finish_request(request, *reason)
        return updated

    def finish_request(
        self, request: Request, finish_reason: str, stop_reason: str | int | None = None
    ) -> None:
        """Finish (or abort) a request wherever it is and free its blocks."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason, request.stop_reason = finish_reason, stop_reason
        request.times.finished = time.monotonic()
        del self.requests[request.request_id]

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _check_stop(self, request: Request) -> tuple[str, str | int | None] | None:
        params = request.sampling_params
        token_id = request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop", None
            if token_id in params.stop_token_ids:
                return "stop", token_id
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return "length", None
        return None
