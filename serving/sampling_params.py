"""Per-request sampling settings, named as in vLLM and OpenAI."""

from dataclasses import dataclass, field

from kvpilot.serving.structured_outputs import StructuredOutputsParams
from kvpilot.serving.validation import InvalidParameter

# Below this, a temperature means greedy (vLLM's _SAMPLING_EPS): dividing logits by 1e-38
# overflows float32, and the probabilities become NaN.
GREEDY_TEMPERATURE = 1e-5
# What `torch.Generator.manual_seed` takes; sequence i of a request is seeded with `seed + i`.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per sampled token
    prompt_logprobs: int | None = None  # number of top logprobs per prompt token (vLLM's extra)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # what the output must match

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            (self.n >= 1, "n", "must be >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "must be -1, 0 (disabled) or positive"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens})",
            ),
            (all(self.stop), "stop", "stop strings must not be empty"),  # "" would match at once
            (
                self.seed is None or MIN_SEED <= self.seed <= MAX_SEED - (self.n - 1),
                "seed",
                f"must be in [{MIN_SEED}, {MAX_SEED - (self.n - 1)}] (sequence i is seeded with seed + i)",
            ),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "must be >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", "must be >= 0"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise InvalidParameter(name, message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
