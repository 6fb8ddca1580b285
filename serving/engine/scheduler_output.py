"""The one dataclass the scheduler hands the model runner each step."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request to compute this step.

    `token_ids` are the request's tokens at positions
    [num_computed_tokens, num_computed_tokens + len(token_ids)); their K/V are written to the
    slots the block table gives for those positions. When `sample` is true the chunk reaches
    the end of the request's known tokens, so the runner returns logits for its last token and
    for each of its `spec_token_ids` (draft tokens, the last entries of `token_ids`, which the
    sampler then verifies). `prompt_logprob_token_ids` are the prompt tokens that the chunk's
    first positions predict, when the request asked for prompt logprobs (top
    `num_prompt_logprobs`).
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    sample: bool
    spec_token_ids: list[int] = field(default_factory=list)
    prompt_logprob_token_ids: list[int] = field(default_factory=list)
    num_prompt_logprobs: int = 0

    @property
    def num_sample_rows(self) -> int:
        """Logit rows this chunk gets for sampling: its last token's and one per draft token."""
        return 1 + len(self.spec_token_ids) if self.sample else 0


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # decodes and prefill chunks, in any mix
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.chunks
