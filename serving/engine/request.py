"""One sequence the engine generates: its tokens, progress through the model, and sampling state.

A user request with `n > 1` becomes n `Request`s (one per completion) that share the prompt and
therefore the prompt's cached KV blocks; `LLMEngine` merges them back into one `RequestOutput`.
"""

import enum
import itertools
import time
from dataclasses import dataclass, field

from kvpilot.serving.engine.outputs import RequestTimes
from kvpilot.serving.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits at the front of the queue to recompute
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # sampling_params.max_tokens, resolved against max_model_len
    generator: object | None = None  # torch.Generator for seeded requests; the sampler owns its use
    parent_id: str | None = None  # the user's request id (None: this is the user's request)
    index: int = 0  # which of the parent's n completions
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in this request's blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first scheduling
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    times: RequestTimes = field(default_factory=lambda: RequestTimes(arrival=time.monotonic()))
    # Arrival order decides preemption (latest first); ties never happen.
    arrival_seq: int = field(default_factory=lambda: next(_arrival_counter))
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks, filled as they appear
    grammar: object | None = None  # structured_output.GrammarState when the output must match one
    # Per prompt token {token_id: logprob, top ids: logprob} (None for the first), filled during
    # the prefill when asked for; None when not asked.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def output_id(self) -> str:
        """The id the caller knows: the parent's for a child of an n > 1 request."""
        return self.parent_id if self.parent_id is not None else self.request_id

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.all_token_ids[start:end]
