"""The synchronous engine: ModelRunner + Scheduler + Sampler + detokenizers.

`step()` is schedule -> run the model -> update from its output. A user request with n > 1
becomes n sequences (children) that share the prompt's cached blocks and are reported together.
"""

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.engine.cpu_share import CpuShare
from kvpilot.serving.engine.detokenizer import IncrementalDetokenizer
from kvpilot.serving.engine.kv_cache_manager import KVCacheManager
from kvpilot.serving.engine.model_runner import ModelRunner, ModelRunnerOutput
from kvpilot.serving.engine.ngram_proposer import NgramProposer
from kvpilot.serving.engine.outputs import CompletionOutput, RequestOutput, RequestTimes
from kvpilot.serving.engine.request import Request
from kvpilot.serving.engine.sampler import Sampler
from kvpilot.serving.engine.scheduler import Scheduler
from kvpilot.serving.engine.scheduler_output import SchedulerOutput
from kvpilot.serving.engine.spec_decode import RejectionSampler
from kvpilot.serving.engine.stats import EngineStats
from kvpilot.serving.engine.structured_output import StructuredOutputManager
from kvpilot.serving.sampling_params import SamplingParams
from kvpilot.serving.validation import CONTEXT_LENGTH_EXCEEDED, InvalidParameter


@dataclass
class UserRequest:
    """What the caller submitted: one prompt, n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    arrival: float
    sequences: list[Request] = field(default_factory=list)
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_runner = ModelRunner(config)
        runner = self.model_runner
        self.tokenizer = runner.tokenizer
        self.chat_template = runner.chat_template
        self.max_model_len = runner.max_model_len
        self.vocab_size = runner.vocab_size
        self.eos_token_ids = set(runner.eos_token_ids)
        self.num_kv_blocks, self.block_size = runner.num_kv_blocks, runner.block_size
        kv_cache_manager = KVCacheManager(
            runner.num_kv_blocks, runner.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            kv_cache_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            runner.max_model_len,
            runner.eos_token_ids,
        )
        self.sampler = Sampler(runner.eos_token_ids, torch.Generator().manual_seed(config.seed))
        self._structured_output: StructuredOutputManager | None = None  # built on first use
        self._structured_output_lock = threading.Lock()
        self.proposer = None
        if config.speculative:
            self.proposer = NgramProposer(config.speculative_ngram, config.num_speculative_tokens)
        self.rejection_sampler = RejectionSampler(self.sampler)
        self._requests: dict[str, UserRequest] = {}
        # On CPU, threads follow the cores other processes leave free (see cpu_share.py).
        self.cpu_share = (
            CpuShare(torch.get_num_threads(), torch.set_num_threads) if runner.device.type == "cpu" else None
        )

    @property
    def structured_output(self) -> StructuredOutputManager:
        """The grammar compiler and its cache, built when the first request needs it."""
        if self.tokenizer is None:
            raise InvalidParameter(
                "structured_outputs", "structured outputs need a tokenizer; this model has none"
            )
        with self._structured_output_lock:
            if self._structured_output is None:
                self._structured_output = StructuredOutputManager(
                    self.tokenizer, self.vocab_size, self.eos_token_ids
                )
        return self._structured_output

    # Requests in and out

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival: float | None = None,
    ) -> None:
        """Validate and queue a request; bad input raises ValueError naming the problem."""
        self.add_processed_request(self.process_request(request_id, prompt, params, arrival))

    def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the grammar `params` asks for into the cache, ahead of `process_request` (which
        `AsyncLLM` runs on the event loop; this may take seconds, on any thread)."""
        if params.structured_outputs is not None:
            self.structured_output.compile(params.structured_outputs)

    def process_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival: float | None = None,
    ) -> UserRequest:
        """Tokenize and validate without touching engine state (so `AsyncLLM` can do it on the
        event loop and report errors at once)."""
        params = params or SamplingParams()
        if not isinstance(request_id, str) or not request_id:
            raise InvalidParameter("request_id", "must be a non-empty string")
        prompt_text, prompt_token_ids = self._tokenize(prompt)
        max_tokens = self._resolve_max_tokens(len(prompt_token_ids), params)
        self._validate_params(params)
        structured = self.structured_output if params.structured_outputs is not None else None
        user = UserRequest(request_id, prompt_text, prompt_token_ids, arrival or time.monotonic())
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator().manual_seed(params.seed + index)
            sequence = Request(
                request_id if params.n == 1 else f"{request_id}#{index}",
                list(prompt_token_ids),
                params,
                max_tokens,
                generator=generator,
                parent_id=None if params.n == 1 else request_id,
                index=index,
                times=RequestTimes(arrival=user.arrival),
                grammar=structured.new_matcher(params.structured_outputs) if structured else None,
                # the n sequences share the prompt: the first one computes its logprobs
                prompt_logprobs=[] if params.prompt_logprobs is not None and index == 0 else None,
            )
            user.sequences.append(sequence)
            user.detokenizers.append(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params))
        return user

    def add_processed_request(self, user: UserRequest) -> None:
        taken = [s.request_id for s in user.sequences if s.request_id in self.scheduler.requests]
        if user.request_id in self._requests or taken:
            raise InvalidParameter("request_id", f"{user.request_id!r} is already in the engine")
        self._requests[user.request_id] = user
        for sequence in user.sequences:
            self.scheduler.add_request(sequence)

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Finish the requests with reason "abort" and free their blocks at once; unknown ids are
        ignored (they may have finished already). Returns their final outputs."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for request_id in ids:
            user = self._requests.get(request_id)
            if user is None:
                continue
            for sequence in user.sequences:
                self.scheduler.finish_request(sequence, "abort")
            outputs.append(self._make_output(user))
        return outputs

    def reset_prefix_cache(self) -> None:
        """After a step that raised (an interrupt, an out-of-memory forward) and its requests were
        aborted: no later request may hit the blocks that step registered but never wrote."""
        self.scheduler.kv_cache_manager.block_pool.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def get_stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_cache_usage=s.kv_cache_manager.usage,
            num_kv_blocks=self.num_kv_blocks,
            block_size=self.block_size,
            num_preemptions=s.num_preemptions,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            prompt_tokens=s.prompt_tokens,
            generation_tokens=s.generation_tokens,
            spec_decode_num_draft_tokens=s.num_draft_tokens,
            spec_decode_num_accepted_tokens=s.num_accepted_tokens,
        )

    # The step

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the cumulative outputs of the requests that advanced."""
        if self.proposer is not None:
            self._propose_drafts()
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        if self.cpu_share is not None:
            self.cpu_share.adjust()
        runner_output = self.model_runner.execute_model(scheduler_output)
        return self._update_from_output(scheduler_output, runner_output)

    def _propose_drafts(self) -> None:
        """Drafts for every decoding request, never more than its max_tokens and the context allow
        (the step emits up to drafts + 1 tokens)."""
        for request in self.scheduler.running:
            request.spec_token_ids = []
            # A grammar's matcher advances one sampled token at a time: no drafts to verify for it.
            # A seeded sampled request gets none either: how many drafts a step verifies depends on
            # the batch (the step's token budget, where a chunked prefill ends), and so would its
            # random draws; without drafts the seed gives the same tokens whatever the batch.
            seeded = request.sampling_params.seed is not None and not request.sampling_params.is_greedy
            if (
                request.num_tokens - request.num_computed_tokens == 1
                and request.grammar is None
                and not seeded
            ):
                room = min(
                    request.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens
                )
                request.spec_token_ids = self.proposer.propose(request, room - 1)

    def _sample(
        self, scheduler_output: SchedulerOutput, logits: torch.Tensor
    ) -> tuple[list[list[int]], list[list[dict[int, float]] | None]]:
        """New tokens (and their logprobs) of each sampling chunk, in chunk order."""
        chunks = [c for c in scheduler_output.chunks if c.sample]
        sequences = [self.scheduler.requests[c.request_id] for c in chunks]
        if any(c.spec_token_ids for c in chunks):
            verified = self.rejection_sampler(logits, sequences, [c.spec_token_ids for c in chunks])
            return verified.token_ids, verified.logprobs
        sampled = self.sampler(logits, sequences)
        return [[t] for t in sampled.token_ids], [None if lp is None else [lp] for lp in sampled.logprobs]

    def _update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestOutput]:
        touched: dict[str, UserRequest] = {}
        for chunk in scheduler_output.chunks:
            entries = runner_output.prompt_logprobs.get(chunk.request_id)
            sequence = self.scheduler.requests.get(chunk.request_id)
            if entries is not None and sequence is not None:
                # entry i is prompt token i + 1's; a preempted request recomputes the same values
                start = chunk.num_computed_tokens
                sequence.prompt_logprobs[start : start + len(entries)] = entries
        token_ids, logprobs = self._sample(scheduler_output, runner_output.logits)
        sample_ids = [c.request_id for c in scheduler_output.chunks if c.sample]
        logprobs_by_id = dict(zip(sample_ids, logprobs, strict=True))

        def check_stop_string(sequence: Request) -> str | None:
            user = self._requests[sequence.output_id]
            return user.detokenizers[sequence.index].append(sequence.output_token_ids[-1])

        updated = self.scheduler.update_from_output(scheduler_output, token_ids, check_stop_string)
        for sequence, num_appended in updated:
            if sequence.grammar is not None and not sequence.is_finished:
                self._advance_grammar(sequence)
            if logprobs_by_id[sequence.request_id] is not None:
                sequence.output_logprobs += logprobs_by_id[sequence.request_id][:num_appended]
            touched[sequence.output_id] = self._requests[sequence.output_id]
        return [self._make_output(user) for user in touched.values()]

    def _advance_grammar(self, sequence: Request) -> None:
        """Feed the sampled token to the sequence's grammar. A grammar that took its stop token
        (kept going only by ignore_eos) is complete: the sequence ends with "stop". The mask
        allowed only tokens the grammar accepts, so a refusal means a broken grammar: end too,
        rather than generate unconstrained text."""
        grammar = sequence.grammar
        if not grammar.accept(sequence.output_token_ids[-1]) or grammar.is_terminated:
            self.scheduler.finish_request(sequence, "stop")

    def _make_output(self, user: UserRequest) -> RequestOutput:
        finished = user.finished
        if finished:
            del self._requests[user.request_id]
        completions = []
        for sequence, detokenizer in zip(user.sequences, user.detokenizers, strict=True):
            completions.append(
                CompletionOutput(
                    index=sequence.index,
                    text=detokenizer.output_text(sequence.is_finished),
                    token_ids=list(sequence.output_token_ids),
                    logprobs=list(sequence.output_logprobs)
                    if sequence.sampling_params.logprobs is not None
                    else None,
                    finish_reason=sequence.finish_reason,
                    stop_reason=sequence.stop_reason,
                )
            )
        first = user.sequences[0]
        return RequestOutput(
            request_id=user.request_id,
            prompt=user.prompt,
            prompt_token_ids=list(user.prompt_token_ids),
            prompt_logprobs=None if first.prompt_logprobs is None else [None, *first.prompt_logprobs],
            outputs=completions,
            finished=finished,
            num_cached_tokens=user.sequences[0].num_cached_tokens,
            times=_merge_times(user),
        )

    # Validation

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameter(
                    "prompt", "this model has no tokenizer; pass token ids instead of text"
                )
            token_ids = list(self.tokenizer.encode(prompt))
            text = prompt
        else:
            token_ids, text = list(prompt), None
            bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool)]
            if bad:
                raise InvalidParameter("prompt", f"token ids must be integers, got {bad[0]!r}")
            outside = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if outside:
                raise InvalidParameter(
                    "prompt", f"token id {outside[0]} is outside the vocabulary [0, {self.vocab_size})"
                )
        if not token_ids:
            raise InvalidParameter("prompt", "must not be empty")
        return text, token_ids

    def _resolve_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """max_tokens against max_model_len and the KV pool (a request must fit the pool alone,
        or preemption could never make room for it)."""
        pool_tokens = self.num_kv_blocks * self.block_size
        limit = min(self.max_model_len, pool_tokens)
        limit_name = (
            "max_model_len" if limit == self.max_model_len else "the KV cache (num_kv_blocks * block_size)"
        )
        if num_prompt_tokens >= limit:
            raise InvalidParameter(
                "prompt",
                f"{num_prompt_tokens} tokens leave no room to generate within {limit_name} = {limit}",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        if params.max_tokens is None:
            return limit - num_prompt_tokens
        if num_prompt_tokens + params.max_tokens > limit:
            raise InvalidParameter(
                "max_tokens",
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds {limit_name} = {limit}",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        return params.max_tokens

    def _validate_params(self, params: SamplingParams) -> None:
        for name, ids in (("logit_bias", list(params.logit_bias)), ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if outside:
                raise InvalidParameter(
                    name, f"token id {outside[0]!r} is outside the vocabulary [0, {self.vocab_size})"
                )
        if params.stop and self.tokenizer is None:
            raise InvalidParameter(
                "stop", "stop strings need a tokenizer; this model has none (use stop_token_ids)"
            )


def _merge_times(user: UserRequest) -> RequestTimes:
    """One request's times; for n > 1 the earliest start and the latest end of its sequences."""
    times = [s.times for s in user.sequences]
    if len(times) == 1:
        return replace(times[0])

    def first(values):
        present = [v for v in values if v is not None]
        return min(present) if present else None

    return RequestTimes(
        arrival=user.arrival,
        first_scheduled=first(t.first_scheduled for t in times),
        first_token=first(t.first_token for t in times),
        last_token=max((t.last_token for t in times if t.last_token is not None), default=None),
        finished=max(t.finished for t in times) if user.finished else None,
    )
