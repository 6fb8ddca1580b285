"""The one dataclass the scheduler hands the model runner each step."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request to compute this step.

    `token_ids` are the request's tokens at positions
    [num_computed_tokens, num_computed_tokens + len(token_ids)); their K/V are written to the
    slots the block table gives for those positions. When `sample` is true the chunk reaches
    the end of the request's known tokens, so the runner returns logits for its last token; when
    `prompt_logprobs` is true, for every one of its positions too (after all sampled rows).
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    sample: bool
    prompt_logprobs: bool = False  # the runner also returns logits for every position of the chunk


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # decodes and prefill chunks, in any mix
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.chunks
