"""Continuous batching in the vLLM V1 style: one token budget per step, no prefill/decode phases.

Every request has `num_tokens` (prompt + output) and `num_computed_tokens`; each step the
scheduler gives out up to `max_num_batched_tokens` tokens to close that gap, running requests
first (oldest first: decodes and unfinished prefill chunks), then waiting requests (after their
prefix-cache hits). A prompt longer than the remaining budget is simply chunked. When the block
pool runs dry, the latest-arrived running request is preempted: its blocks are freed and it
recomputes everything later (its tokens are kept, and often its prefix is still cached).

Speculative decoding fits the same rule: a decoding request with draft tokens asks for 1 + k
tokens (its last token and the drafts, budget and KV slots included); after verification
`num_computed_tokens` keeps only the accepted ones (+ 1) and the rejected drafts' slots are given
back. A request that asked for prompt logprobs computes its whole prompt, prefix-cache hits or not.

Plain Python: never touches torch.
"""

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterable

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
        self.num_draft_tokens = 0  # draft tokens verified
        self.num_accepted_tokens = 0  # of those, accepted

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
            num_new_tokens = request.num_tokens - request.num_computed_tokens
            if num_new_tokens == 1:  # decoding: verify the drafts in the same step
                num_new_tokens += len(request.spec_token_ids)
            num_new_tokens = min(num_new_tokens, token_budget)
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
            # A request that needs its prompt's logits recomputes cached blocks: no lookup.
            looks_up = self.kv_cache_manager.enable_caching and not _needs_prompt_logprobs(request)
            hits, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request) if looks_up else ([], 0)
            num_new_tokens = min(request.num_tokens - num_hit_tokens, token_budget)
            if self.kv_cache_manager.allocate_slots(request, num_new_tokens, hits) is None:
                break
            self.waiting.popleft()
            if looks_up:
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

        chunks = [self._chunk(request, num_new_tokens) for request, num_new_tokens in scheduled]
        return SchedulerOutput(chunks=chunks, num_batched_tokens=self.max_num_batched_tokens - token_budget)

    def _chunk(self, request: Request, num_new_tokens: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new_tokens
        spec_token_ids = request.spec_token_ids[: max(0, end - request.num_tokens)]
        prompt_logprob_token_ids = []
        if _needs_prompt_logprobs(request):  # positions start..end-1 predict prompt tokens start+1..
            prompt_logprob_token_ids = request.prompt_token_ids[start + 1 : end + 1]
        request.num_computed_tokens = end
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids_slice(start, end - len(spec_token_ids)) + spec_token_ids,
            num_computed_tokens=start,
            block_table=self.kv_cache_manager.get_block_ids(request.request_id),
            sample=end >= request.num_tokens,
            spec_token_ids=spec_token_ids,
            prompt_logprob_token_ids=prompt_logprob_token_ids,
            num_prompt_logprobs=request.sampling_params.prompt_logprobs or 0,
        )

    def update_from_output(
        self,
        scheduler_output: SchedulerOutput,
        sampled_token_ids: list[list[int]],
        check_stop_string: Callable[[Request], str | None] | None = None,
    ) -> list[tuple[Request, int]]:
        """Append each sampling chunk's new tokens (in chunk order: its accepted drafts, then one
        sampled token) one at a time, apply the stop rules after each and drop the tokens after a
        stop; free finished requests. `check_stop_string(request)` sees each token right after
        it is appended and returns the stop string it completed, if any (that wins over any other
        stop rule). Returns the requests that received tokens, with how many."""
        sample_chunks = [chunk for chunk in scheduler_output.chunks if chunk.sample]
        if len(sample_chunks) != len(sampled_token_ids):
            raise ValueError(f"got {len(sampled_token_ids)} sampled tokens for {len(sample_chunks)} chunks")
        updated = []
        now = time.monotonic()
        for chunk, token_ids in zip(sample_chunks, sampled_token_ids, strict=True):
            request = self.requests.get(chunk.request_id)
            if request is None or request.is_finished:
                continue  # aborted while its step ran
            num_accepted = len(token_ids) - 1
            if chunk.spec_token_ids:
                self.num_draft_tokens += len(chunk.spec_token_ids)
                self.num_accepted_tokens += num_accepted
                # K/V of the rejected drafts are garbage: forget them and give back their slots.
                request.num_computed_tokens -= len(chunk.spec_token_ids) - num_accepted
                self.kv_cache_manager.free_slots_after(request, request.num_computed_tokens)
            if request.num_output_tokens == 0:
                self.prompt_tokens += request.num_prompt_tokens
                request.times.first_token = now
            request.times.last_token = now
            num_appended = 0
            for token_id in token_ids:
                request.output_token_ids.append(token_id)
                num_appended += 1
                reason = self._check_stop(request)
                stop_string = check_stop_string(request) if check_stop_string is not None else None
                if stop_string is not None:
                    reason = "stop", stop_string
                if reason is not None:
                    self.finish_request(request, *reason)
                    break
            self.generation_tokens += num_appended
            updated.append((request, num_appended))
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


def _needs_prompt_logprobs(request: Request) -> bool:
    return (
        request.prompt_logprobs is not None and len(request.prompt_logprobs) < request.num_prompt_tokens - 1
    )
