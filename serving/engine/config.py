"""Engine configuration: built once, validated, never mutated.

Values discovered at start-up (EOS ids, number of KV blocks, max_model_len when not
given) live in the runtime objects (`ModelRunner`, `LLMEngine`), not here.
"""

from dataclasses import dataclass

from kvpilot.serving.contract import DTYPES, KV_CACHE_DTYPES, QUANTIZATION_MODES
from kvpilot.serving.validation import InvalidParameter


@dataclass(frozen=True)
class EngineConfig:
    model: str  # checkpoint directory or .gguf file
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_bytes
    kv_cache_memory_bytes: int | None = None  # None: CUDA from gpu_memory_utilization, CPU 1 GiB
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's own context length
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # the runner resolves it (loader.resolve_dtype)
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.block_size > 0, "block_size", "must be > 0")
        _require(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks", "must be > 0")
        _require(
            self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
            "kv_cache_memory_bytes",
            "must be > 0",
        )
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        _require(self.max_num_seqs > 0, "max_num_seqs", "must be > 0")
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0")
        _require(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be > 0")
        _require(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        _require(
            self.quantization in QUANTIZATION_MODES, "quantization", f"must be one of {QUANTIZATION_MODES}"
        )
        _require(
            self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES}"
        )


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidParameter(field, message)
