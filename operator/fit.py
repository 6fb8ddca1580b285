"""Will the model fit in a replica's memory? A pure estimate from the spec alone (no download, no
GPU).

Weights: every linear layer (q, k, v, o, gate, up, down, and an untied output head) in the
quantized format the server converts it to (kernels/quant: int8/w8a8/fp8 one byte per weight
plus a float32 scale per output row; int4 half a byte plus a float16 scale and min per 32
columns); embeddings and norms stay in the model dtype. KV cache: K and V of every layer per
token (int8 adds a float32 scale per token and head), times maxModelLen tokens (rounded up to
whole blocks) per sequence.

The budget is planned as the server sizes its cache. On a GPU: `resources.gpu.memory` x
gpuMemoryUtilization, and the KV cache gets what the weights leave. On a CPU replica:
`resources.memory` (the pod's limit) x CPU_MEMORY_UTILIZATION, less CPU_SERVER_BYTES for the
server itself (Python, torch and the HTTP stack), and the KV cache is the CPU default (1 GiB)
or what the weights leave, if less. Activations are not counted (the utilization's headroom).

It does not fit, and the InferenceService is Stalled before any pod is scheduled, when the
weights and the KV cache of ONE full-length sequence exceed the budget (or, with kvCacheMemory,
when weights + kvCacheMemory do, or the cache cannot hold one sequence): no replica could
serve. KV for maxModelLen x maxNumSeqs beyond that is reported, not enforced: the scheduler
queues what the cache cannot hold at once, as vLLM's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubernetes.utils.quantity import parse_quantity
from kvpilot.operator.api import InferenceService
from kvpilot.operator.api.model import ModelShape
from kvpilot.serving.contract import CPU_KV_CACHE_BYTES, CPU_MEMORY_UTILIZATION, SERVE_SETTING

GiB = 1 << 30
# The server's working set besides its weights and KV cache: Python, torch (its CUDA build) and the
# HTTP stack; measured in a memory cgroup on our Zen 4 (working set after loading less the weights),
# 0.34-0.43 GiB for SmolLM2 in int4 and float32. Rounded up: activations are not counted either.
CPU_SERVER_BYTES = GiB // 2
INT4_GROUP_SIZE = 32  # kernels/quant/quantize.py DEFAULT_GROUP_SIZE
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_CHECKPOINT_DTYPE_BYTES = 2  # `--dtype auto` on a GPU: the checkpoint's bf16/fp16
CPU_DTYPE_BYTES = 4  # float32: the server's default (and `auto`) on CPU


def linear_bytes(out_features: int, in_features: int, quantization: str, dtype_bytes: int) -> int:
    weights = out_features * in_features
    if quantization == "none":
        return weights * dtype_bytes
    if quantization == "int4":
        groups = out_features * math.ceil(in_features / INT4_GROUP_SIZE)
        return weights // 2 + groups * 4  # float16 scale and min per group
    return weights + out_features * 4  # int8, w8a8, fp8: a float32 scale per output row


def weight_bytes(shape: ModelShape, quantization: str, dtype_bytes: int) -> int:
    hidden, inter, head_dim = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q_width, kv_width = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    layer_linears = [
        (q_width, hidden), (kv_width, hidden), (kv_width, hidden), (hidden, q_width),
        (inter, hidden), (inter, hidden), (hidden, inter),
    ]  # fmt: skip
    per_layer = sum(linear_bytes(o, i, quantization, dtype_bytes) for o, i in layer_linears)
    layer_norms = 2 * hidden + (2 * head_dim if shape.qk_norm else 0)
    total = shape.num_hidden_layers * (per_layer + layer_norms * dtype_bytes)
    total += shape.vocab_size * hidden * dtype_bytes + hidden * dtype_bytes  # embeddings, final norm
    if not shape.tie_word_embeddings:
        total += linear_bytes(shape.vocab_size, hidden, quantization, dtype_bytes)
    return total


def kv_bytes_per_token(shape: ModelShape, kv_cache_dtype: str, dtype_bytes: int) -> int:
    per_head = {
        "auto": shape.head_dim * dtype_bytes,
        "int8": shape.head_dim + 4,  # int8 values and a float32 scale
        "fp8": shape.head_dim,
    }[kv_cache_dtype]
    return shape.num_hidden_layers * 2 * shape.num_key_value_heads * per_head


@dataclass(frozen=True)
class FitEstimate:
    weight_bytes: int
    kv_bytes_per_token: int
    max_model_len: int | None
    max_num_seqs: int
    kv_cache_memory: int | None  # spec.engine.kvCacheMemory, if set
    memory: int | None  # one GPU's memory on a GPU replica, resources.memory on a CPU one
    utilization: float
    on_gpu: bool = True

    @property
    def memory_field(self) -> str:
        """The spec field the budget comes from (named in errors)."""
        return "spec.resources.gpu.memory" if self.on_gpu else "spec.resources.memory"

    @property
    def server_bytes(self) -> int:
        return 0 if self.on_gpu else CPU_SERVER_BYTES

    @property
    def sequence_kv_bytes(self) -> int | None:
        """KV cache of one full-length sequence (whole blocks)."""
        if self.max_model_len is None:
            return None
        block = SERVE_SETTING["block_size"].default
        return math.ceil(self.max_model_len / block) * block * self.kv_bytes_per_token

    @property
    def batch_kv_bytes(self) -> int | None:
        """KV cache of maxNumSeqs full-length sequences."""
        one = self.sequence_kv_bytes
        return None if one is None else one * self.max_num_seqs

    @property
    def budget_bytes(self) -> int | None:
        """What the weights and the KV cache may take."""
        return None if self.memory is None else int(self.memory * self.utilization) - self.server_bytes

    @property
    def kv_available_bytes(self) -> int | None:
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        budget = self.budget_bytes
        if budget is None:
            return None
        left = budget - self.weight_bytes
        return left if self.on_gpu else min(left, CPU_KV_CACHE_BYTES)

    @property
    def fits(self) -> bool | None:
        """None when it cannot be told (no memory or no maxModelLen)."""
        budget, one = self.budget_bytes, self.sequence_kv_bytes
        if budget is None or one is None:
            return None
        if self.kv_cache_memory is not None and self.weight_bytes + self.kv_cache_memory > budget:
            return False
        return self.kv_available_bytes >= one

    @property
    def full_length_sequences(self) -> int | None:
        """How many maxModelLen-token sequences the KV cache holds at once."""
        available, one = self.kv_available_bytes, self.sequence_kv_bytes
        if available is None or one is None:
            return None
        return max(available, 0) // one

    def message(self) -> str:
        weights = f"weights {gib(self.weight_bytes)}"
        if self.max_model_len is None:
            return f"{weights}; KV cache unknown: set spec.engine.maxModelLen or maxPositionEmbeddings"
        batch = f"{self.max_num_seqs} x {self.max_model_len} tokens"
        if self.budget_bytes is None:
            kv = f"KV cache {gib(self.batch_kv_bytes)} for {batch}"
            return f"{weights} + {kv}; set {self.memory_field.removeprefix('spec.')} to check the fit"
        budget = f"{gib(self.budget_bytes)} ({self.utilization:g} of {gib(self.memory)}"
        budget += ")" if self.on_gpu else f" memory - {gib(self.server_bytes)} for the server)"
        if self.kv_cache_memory is not None:
            kv = f"KV cache {gib(self.kv_cache_memory)} (kvCacheMemory)"
            if self.weight_bytes + self.kv_cache_memory > self.budget_bytes:
                return f"does not fit: {weights} + {kv} > {budget}"
        else:
            kv = f"KV cache {gib(self.sequence_kv_bytes)} for one {self.max_model_len}-token sequence"
            if self.weight_bytes + self.sequence_kv_bytes > self.budget_bytes:
                return f"does not fit: {weights} + {kv} > {budget}"
            if not self.on_gpu:  # it fits the budget, but not the server's default cache
                kv = (
                    f"the CPU default KV cache {gib(self.kv_available_bytes)} (set spec.engine.kvCacheMemory)"
                )
        if not self.fits:
            return f"does not fit: {kv} holds no {self.max_model_len}-token sequence"
        if self.kv_cache_memory is None and self.batch_kv_bytes <= self.kv_available_bytes:
            return f"fits: {weights} + KV cache {gib(self.batch_kv_bytes)} for {batch} <= {budget}"
        held = min(self.full_length_sequences, self.max_num_seqs)
        return (
            f"fits: {weights} + {gib(self.kv_available_bytes)} KV cache of {budget}, holding {held} of "
            f"{self.max_num_seqs} sequences at {self.max_model_len} tokens (KV cache for {batch}: "
            f"{gib(self.batch_kv_bytes)}; the rest wait)"
        )


def gib(size: int) -> str:
    return f"{size / GiB:.1f} GiB"


def estimate(isvc: InferenceService) -> FitEstimate | None:
    """The estimate for spec.model.architecture, or None when the spec gives no architecture."""
    architecture = isvc.spec.model.architecture
    if architecture is None:
        return None
    shape = architecture.shape()
    engine, resources = isvc.spec.engine, isvc.spec.resources
    on_gpu = resources.gpu.count > 0
    default_bytes = GPU_CHECKPOINT_DTYPE_BYTES if on_gpu else CPU_DTYPE_BYTES
    memory = resources.gpu.memory if on_gpu else resources.memory
    utilization = (
        engine.gpu_memory_utilization or SERVE_SETTING["gpu_memory_utilization"].default
        if on_gpu
        else CPU_MEMORY_UTILIZATION
    )
    dtype_bytes = DTYPE_BYTES.get(engine.dtype or "auto", default_bytes)
    return FitEstimate(
        weight_bytes=weight_bytes(shape, engine.quantization, dtype_bytes),
        kv_bytes_per_token=kv_bytes_per_token(shape, engine.kv_cache_dtype, dtype_bytes),
        max_model_len=engine.max_model_len or shape.max_position_embeddings,
        max_num_seqs=engine.max_num_seqs or SERVE_SETTING["max_num_seqs"].default,
        kv_cache_memory=None
        if engine.kv_cache_memory is None
        else int(parse_quantity(engine.kv_cache_memory)),
        memory=None if memory is None else int(parse_quantity(memory)),
        utilization=utilization,
        on_gpu=on_gpu,
    )
