"""Engine statistics, read by the HTTP server's /metrics."""

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_kv_blocks: int
    block_size: int
    # Monotonic counters since start-up:
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    prompt_tokens: int  # prompt tokens of requests whose prefill finished
    generation_tokens: int
    spec_decode_num_draft_tokens: int = 0  # draft tokens verified (speculative decoding)
    spec_decode_num_accepted_tokens: int = 0  # of those, accepted
