"""What the engine hands back to callers. Token ids and text are cumulative."""

from dataclasses import dataclass, field


@dataclass
class RequestTimes:
    arrival: float  # time.monotonic() when the request was added
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # One entry per generated token: {token_id: logprob} for the sampled token and the top-k.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Per prompt token {token_id: logprob, top ids: logprob}, None for the first; when asked for.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    times: RequestTimes | None = None
