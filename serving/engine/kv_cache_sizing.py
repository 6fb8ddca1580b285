"""How many KV blocks the runner allocates, and why: a pure decision from measured figures.

On CUDA the KV cache gets what is left of `gpu_memory_utilization` of the device's memory after
the model's weights, the activation peak of a profiling forward at the largest batch, and memory
torch does not manage (the CUDA context, other processes), as vLLM sizes it. An explicit
`num_kv_blocks` or `kv_cache_memory_bytes` overrides; on CPU the default is 1 GiB.
"""

from dataclasses import dataclass

from kvpilot.serving.validation import InvalidParameter

CPU_KV_CACHE_BYTES = 1 << 30
GIB = 1 << 30


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes measured on the device before the KV cache is allocated."""

    total: int  # the device's memory
    weights: int  # held by torch after loading (weights and model buffers)
    activation_peak: int  # the profiling forward's peak above that
    non_torch: int  # used on the device but not by torch's allocator


@dataclass(frozen=True)
class KVCachePlan:
    num_blocks: int
    bytes_per_block: int
    reason: str  # one line for the start-up log and `cache_config_info`


def plan_kv_cache(
    bytes_per_block: int,
    num_kv_blocks: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    gpu_memory_utilization: float = 0.9,
    memory: DeviceMemory | None = None,
) -> KVCachePlan:
    """`memory` is the device's measured figures on CUDA, None on CPU."""
    if num_kv_blocks is not None:
        return KVCachePlan(num_kv_blocks, bytes_per_block, f"--num-kv-blocks {num_kv_blocks}")
    if kv_cache_memory_bytes is not None or memory is None:
        explicit = kv_cache_memory_bytes is not None
        budget = kv_cache_memory_bytes if explicit else CPU_KV_CACHE_BYTES
        source = "--kv-cache-memory" if explicit else "the CPU default (--kv-cache-memory)"
        reason = f"{source} {_gib(budget)} / {bytes_per_block} bytes per block"
        return KVCachePlan(
            _blocks(budget, bytes_per_block, "kv_cache_memory_bytes", reason), bytes_per_block, reason
        )
    share = int(memory.total * gpu_memory_utilization)
    budget = share - memory.weights - memory.activation_peak - memory.non_torch
    reason = (
        f"--gpu-memory-utilization {gpu_memory_utilization:g} x {_gib(memory.total)} = {_gib(share)}"
        f" - weights {_gib(memory.weights)} - activation peak {_gib(memory.activation_peak)}"
        f" - non-torch {_gib(memory.non_torch)} = {_gib(budget)} / {bytes_per_block} bytes per block"
    )
    return KVCachePlan(
        _blocks(budget, bytes_per_block, "gpu_memory_utilization", reason), bytes_per_block, reason
    )


def _blocks(budget: int, bytes_per_block: int, param: str, reason: str) -> int:
    num_blocks = max(budget, 0) // bytes_per_block
    if num_blocks < 1:
        raise InvalidParameter(param, f"leaves no room for one KV block: {reason}")
    return num_blocks


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB"
