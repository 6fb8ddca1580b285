"""How many KV blocks the runner allocates, and why: a pure decision from measured figures.

On CUDA the KV cache gets what is left of `gpu_memory_utilization` of the device's memory after
the model's weights, the activation peak of a profiling forward at the largest batch, and memory
torch does not manage (the CUDA context, other processes), as vLLM sizes it. An explicit
`num_kv_blocks` or `kv_cache_memory_bytes` overrides.

On CPU the default is 1 GiB. In a container with a memory limit (a Kubernetes pod's
`resources.memory`) the cache must also fit what the limit leaves: CPU_MEMORY_UTILIZATION of the
limit minus the container's working set after loading (Python, torch, the weights); the rest is
headroom for activations. The default shrinks to that, and an explicit `--kv-cache-memory` (or
`--num-kv-blocks`) that does not fit is refused at start-up, with the figures, instead of the pod
being OOM-killed.
"""

from dataclasses import dataclass

from kvpilot.serving.contract import CPU_KV_CACHE_BYTES, CPU_MEMORY_UTILIZATION
from kvpilot.serving.validation import InvalidParameter

GIB = 1 << 30


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes measured on the device before the KV cache is allocated."""

    total: int  # the device's memory
    weights: int  # held by torch after loading (weights and model buffers)
    activation_peak: int  # the profiling forward's peak above that
    non_torch: int  # used on the device but not by torch's allocator


@dataclass(frozen=True)
class HostMemory:
    """A CPU server's container: its memory limit and working set before the KV cache."""

    limit: int
    used: int

    @property
    def left(self) -> int:
        return int(self.limit * CPU_MEMORY_UTILIZATION) - self.used

    def describe(self) -> str:
        return (
            f"{CPU_MEMORY_UTILIZATION:g} x the container's memory limit {_gib(self.limit)}"
            f" - its working set {_gib(self.used)} = {_gib(self.left)}"
        )


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
    host: HostMemory | None = None,
) -> KVCachePlan:
    """`memory` is the device's measured figures on CUDA, None on CPU; `host` the container's
    memory on CPU, None where it has no limit."""
    if host is not None:
        _refuse_what_the_container_cannot_hold(host, bytes_per_block, num_kv_blocks, kv_cache_memory_bytes)
    if num_kv_blocks is not None:
        return KVCachePlan(num_kv_blocks, bytes_per_block, f"--num-kv-blocks {num_kv_blocks}")
    if kv_cache_memory_bytes is not None:
        reason = f"--kv-cache-memory {_gib(kv_cache_memory_bytes)} / {bytes_per_block} bytes per block"
        return _plan(kv_cache_memory_bytes, bytes_per_block, "kv_cache_memory_bytes", reason)
    if memory is None:
        source = f"the CPU default (--kv-cache-memory) {_gib(CPU_KV_CACHE_BYTES)}"
        budget = CPU_KV_CACHE_BYTES
        if host is not None and host.left < CPU_KV_CACHE_BYTES:
            source = f"{source}, capped by {host.describe()}"
            budget = host.left
        return _plan(
            budget, bytes_per_block, "kv_cache_memory_bytes", f"{source} / {bytes_per_block} bytes per block"
        )
    share = int(memory.total * gpu_memory_utilization)
    budget = share - memory.weights - memory.activation_peak - memory.non_torch
    reason = (
        f"--gpu-memory-utilization {gpu_memory_utilization:g} x {_gib(memory.total)} = {_gib(share)}"
        f" - weights {_gib(memory.weights)} - activation peak {_gib(memory.activation_peak)}"
        f" - non-torch {_gib(memory.non_torch)} = {_gib(budget)} / {bytes_per_block} bytes per block"
    )
    return _plan(budget, bytes_per_block, "gpu_memory_utilization", reason)


def _refuse_what_the_container_cannot_hold(
    host: HostMemory, bytes_per_block: int, num_kv_blocks: int | None, kv_cache_memory_bytes: int | None
) -> None:
    """An explicit size (blocks win over bytes, as in the plan) larger than the container leaves."""
    if num_kv_blocks is not None:
        size = num_kv_blocks * bytes_per_block
        param, setting = "num_kv_blocks", f"--num-kv-blocks {num_kv_blocks} ({_gib(size)})"
    elif kv_cache_memory_bytes is not None:
        size = kv_cache_memory_bytes
        param, setting = "kv_cache_memory_bytes", f"--kv-cache-memory {_gib(size)}"
    else:
        return
    if size > host.left:
        raise InvalidParameter(param, f"{setting} does not fit: {host.describe()}")


def _plan(budget: int, bytes_per_block: int, param: str, reason: str) -> KVCachePlan:
    num_blocks = max(budget, 0) // bytes_per_block
    if num_blocks < 1:
        raise InvalidParameter(param, f"leaves no room for one KV block: {reason}")
    return KVCachePlan(num_blocks, bytes_per_block, reason)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB"
