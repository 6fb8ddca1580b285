"""The fp32 roofline: a throughput no engine can beat on this machine for a workload.

Per step the bound is the slower of compute (the step's FLOPs at the fastest fp32 GEMM this
machine has at the model's shapes: MKL's `torch.mm`, oneDNN's pre-packed linear or kvpilot's
panel kernel, the best one per shape) and memory (the bytes a step must read: every weight
once, plus each decoding sequence's K/V, at the measured memory bandwidth). Prefill counts as
compute only. The arithmetic is pure (shapes and peaks in, numbers out); only `measure_*` touch torch.
Per forwarded token a decoder layer costs 2 * (its linear-layer weights) FLOPs plus 4 *
num_heads * head_dim FLOPs per context token for attention (QK^T and PV, causal); lm_head
costs 2 * hidden * vocab FLOPs only at positions that emit an output token.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
        )

    def layer_matmuls(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of one decoder layer's linear ops: qkv, o, gate_up, down."""
        h, d = self.hidden_size, self.head_dim
        return [
            (h, (self.num_heads + 2 * self.num_kv_heads) * d),
            (self.num_heads * d, h),
            (h, 2 * self.intermediate_size),
            (self.intermediate_size, h),
        ]

    @property
    def lm_head(self) -> tuple[int, int]:
        return (self.hidden_size, self.vocab_size)

    def linear_flops_per_token(self) -> int:
        return self.num_layers * sum(2 * k * n for k, n in self.layer_matmuls())

    def lm_head_flops_per_token(self) -> int:
        k, n = self.lm_head
        return 2 * k * n

    def attention_flops_per_context_token(self) -> int:
        return 4 * self.num_heads * self.head_dim * self.num_layers


def request_flops(shape: ModelShape, prompt_len: int, output_len: int) -> int:
    """FLOPs to prefill `prompt_len` tokens and decode `output_len` tokens (the last is never fed back)."""
    forwarded = prompt_len + output_len - 1
    context_sum = forwarded * (forwarded + 1) // 2  # token at position p attends to p + 1 tokens
    return (
        forwarded * shape.linear_flops_per_token()
        + output_len * shape.lm_head_flops_per_token()
        + context_sum * shape.attention_flops_per_context_token()
    )


def workload_flops(shape: ModelShape, lengths: Iterable[tuple[int, int]]) -> int:
    """Total FLOPs of requests given as (prompt_len, output_len) pairs."""
    return sum(request_flops(shape, prompt_len, output_len) for prompt_len, output_len in lengths)


@dataclass(frozen=True)
class Peaks:
    """What this machine can do at most: fp32 GEMM FLOP/s and memory bytes/s."""

    gemm_flops_per_s: float
    memory_bytes_per_s: float

    def best_of(self, other: "Peaks") -> "Peaks":
        return Peaks(
            max(self.gemm_flops_per_s, other.gemm_flops_per_s),
            max(self.memory_bytes_per_s, other.memory_bytes_per_s),
        )


@dataclass(frozen=True)
class RooflineBound:
    output_tokens: int
    compute_s: float  # the compute term summed over steps
    memory_s: float  # the memory term summed over decode steps
    seconds: float  # sum over steps of the slower term
    memory_bound_steps: int
    decode_steps: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def weight_bytes(shape: ModelShape, bytes_per_value: int = 4) -> int:
    """Bytes of every matmul weight (each read once per forward pass)."""
    return bytes_per_value * sum(k * n * repeats for k, n, repeats in matmul_pass_shapes(shape))


def kv_bytes_per_token(shape: ModelShape, bytes_per_value: int = 4) -> int:
    """K and V of one context token over all layers."""
    return bytes_per_value * 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim


def workload_bound(shape: ModelShape, lengths: list[tuple[int, int]], peaks: Peaks) -> RooflineBound:
    """The fastest any engine can run (prompt_len, output_len) requests, all admitted at once.

    Every prompt is prefilled (compute), then decode step t feeds one token of each request
    with output_len > t, at context prompt_len + t; a step takes at least the longer of its
    FLOPs at peak GEMM speed and its reads (all weights + those contexts' K/V) at peak bandwidth.
    """
    if not lengths:
        raise ValueError("lengths: the workload has no requests")
    if peaks.gemm_flops_per_s <= 0 or peaks.memory_bytes_per_s <= 0:
        raise ValueError("peaks: must be > 0")
    token_flops = shape.linear_flops_per_token() + shape.lm_head_flops_per_token()
    attention_flops = shape.attention_flops_per_context_token()
    prefill_flops = sum(request_flops(shape, p, 1) for p, _ in lengths)  # prompt + first output token
    compute_s = prefill_s = prefill_flops / peaks.gemm_flops_per_s
    memory_s, seconds, memory_bound = 0.0, prefill_s, 0
    weights, kv_token = weight_bytes(shape), kv_bytes_per_token(shape)
    decode_steps = max(out for _, out in lengths) - 1
    for t in range(1, decode_steps + 1):
        contexts = [p + t for p, out in lengths if out > t]
        step_flops = len(contexts) * token_flops + attention_flops * sum(contexts)
        step_compute = step_flops / peaks.gemm_flops_per_s
        step_memory = (weights + kv_token * sum(contexts)) / peaks.memory_bytes_per_s
        compute_s += step_compute
        memory_s += step_memory
        seconds += max(step_compute, step_memory)
        memory_bound += step_memory > step_compute
    output_tokens = sum(out for _, out in lengths)
    return RooflineBound(output_tokens, compute_s, memory_s, seconds, memory_bound, decode_steps)


def matmul_pass_shapes(shape: ModelShape) -> list[tuple[int, int, int]]:
    """(in, out, repeats) of one pass through the model's matmuls: each layer shape x layers, lm_head once."""
    return [(k, n, shape.num_layers) for k, n in shape.layer_matmuls()] + [(*shape.lm_head, 1)]


def measure_gemm_flops_per_s(
    shape: ModelShape, rows: tuple[int, ...] = (32, 128, 512), min_time_s: float = 0.3
) -> float:
    """The fastest fp32 GEMM at the model's matmul shapes: per row count, each shape on the
    best of MKL `torch.mm` and each packed linear this machine has (oneDNN's, kvpilot's panel
    kernel: the engine uses one of them); the best row count."""
    import torch
    from kvpilot.kernels.packed_float import packed_float_weights

    best = 0.0
    for batch in rows:
        total_flops, total_time = 0, 0.0
        for k, n, repeats in matmul_pass_shapes(shape):
            x, weight = torch.randn(batch, k), torch.randn(n, k)
            out = torch.empty(batch, n)
            transposed = weight.t()
            candidates = [lambda x=x, w=transposed, out=out: torch.mm(x, w, out=out)]
            candidates += [
                lambda x=x, packed=packed: packed.linear(x) for packed in packed_float_weights(weight)
            ]
            total_flops += 2 * batch * k * n * repeats
            total_time += min(best_time_s(run, min_time_s) for run in candidates) * repeats
        best = max(best, total_flops / total_time)
    return best


def measure_linears_flops_per_s(
    shape: ModelShape, linears: list, batch: int = 128, min_time_s: float = 0.3
) -> float:
    """FLOP/s of an engine's own linear layers, given in `matmul_pass_shapes` order (callables
    x [batch, in] -> [batch, out]), timed as `measure_gemm_flops_per_s` times the peak."""
    import torch

    passes = matmul_pass_shapes(shape)
    if len(linears) != len(passes):
        raise ValueError(f"linears: expected {len(passes)} (one per matmul shape), got {len(linears)}")
    total_flops, total_time = 0, 0.0
    for (k, n, repeats), linear in zip(passes, linears, strict=True):
        x = torch.randn(batch, k)
        total_flops += 2 * batch * k * n * repeats
        total_time += best_time_s(lambda x=x, linear=linear: linear(x), min_time_s) * repeats
    return total_flops / total_time


def memory_test_bytes(largest_cache: int) -> int:
    """A buffer far larger than the caches: 256 MiB, or 4x the last-level cache where that is
    larger (our Xeon guest lists a 260 MiB L3, which could hold a 256 MiB buffer; there, one run
    read 27.5 GB/s with 256 MiB and 27.3 with 1 GiB, a quick probe 28-29 against 24-27)."""
    return max(256 << 20, 4 * largest_cache)


def measure_memory_bytes_per_s(num_bytes: int = 256 << 20, min_time_s: float = 0.5) -> float:
    """Memory bandwidth: the better of a copy (read + write bytes) and a read-only sum over a
    buffer far larger than the caches (`memory_test_bytes`), in huge pages where Linux has them
    (as the engine's KV cache is: 1.25x the bandwidth of 4 KiB pages on our Xeon, so the bound
    stays a bound)."""
    import torch
    from kvpilot.kernels import huge_pages

    source = huge_pages.zeros((num_bytes // 4,), torch.float32).fill_(1.0)
    target = huge_pages.zeros((num_bytes // 4,), torch.float32)
    copy_rate = 2 * num_bytes / best_time_s(lambda: target.copy_(source), min_time_s)
    read_rate = num_bytes / best_time_s(lambda: source.sum(), min_time_s)
    return max(copy_rate, read_rate)


def best_time_s(run, min_time_s: float) -> float:
    """Best wall time of `run()` over repeats adding up to at least `min_time_s` (after a warm-up)."""
    run()
    best, spent = float("inf"), 0.0
    while spent < min_time_s or best == float("inf"):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return best


def load_model_shape(model: str | Path) -> ModelShape:
    """Shapes from a checkpoint directory's config.json or a .gguf file's metadata."""
    from transformers import AutoConfig

    path = Path(model)
    if path.suffix == ".gguf":
        return ModelShape.from_hf_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    return ModelShape.from_hf_config(AutoConfig.from_pretrained(path))
