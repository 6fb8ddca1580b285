"""The fp32 roofline: the FLOPs a workload needs over the measured fp32 `torch.mm` throughput.

The arithmetic is pure (shapes in, numbers out); only `measure_mm_flops_per_s` touches torch.
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


def roofline_tokens_per_s(total_flops: int, output_tokens: int, flops_per_s: float) -> float:
    """Output tokens/s of an engine that spends exactly `total_flops` at `flops_per_s`."""
    if total_flops <= 0 or flops_per_s <= 0:
        raise ValueError("total_flops and flops_per_s must be > 0")
    return output_tokens * flops_per_s / total_flops


def matmul_pass_shapes(shape: ModelShape) -> list[tuple[int, int, int]]:
    """(in, out, repeats) of one pass through the model's matmuls: each layer shape x layers, lm_head once."""
    return [(k, n, shape.num_layers) for k, n in shape.layer_matmuls()] + [(*shape.lm_head, 1)]


def measure_mm_flops_per_s(shape: ModelShape, batch: int = 128, min_time_s: float = 0.3) -> float:
    """fp32 torch.mm FLOP/s on the model's matmul shapes at `batch` rows (best of repeated runs)."""
    import torch

    total_flops = 0
    total_time = 0.0
    for k, n, repeats in matmul_pass_shapes(shape):
        a, b = torch.randn(batch, k), torch.randn(k, n)
        out = torch.empty(batch, n)
        torch.mm(a, b, out=out)  # warm-up
        best = float("inf")
        spent = 0.0
        while spent < min_time_s or best == float("inf"):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            elapsed = time.perf_counter() - start
            best = min(best, elapsed)
            spent += elapsed
        total_flops += 2 * batch * k * n * repeats
        total_time += best * repeats
    return total_flops / total_time


def load_model_shape(model: str | Path) -> ModelShape:
    """Shapes from a checkpoint directory's config.json or a .gguf file's metadata."""
    from transformers import AutoConfig

    path = Path(model)
    if path.suffix == ".gguf":
        return ModelShape.from_hf_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    return ModelShape.from_hf_config(AutoConfig.from_pretrained(path))
