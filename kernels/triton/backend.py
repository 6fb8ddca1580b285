"""The Triton kernel set behind `kvpilot.kernels.backend.select_backend` for CUDA tensors."""

import torch
from kvpilot.kernels import row_ops
from kvpilot.kernels.attention import AttentionMetadata
from kvpilot.kernels.backend import KernelBackend
from kvpilot.kernels.quant import Int4Weight, Int8Weight, QuantizedWeight
from kvpilot.kernels.quant.kv_cache import KVCache
from kvpilot.kernels.triton.kv_write import reshape_and_cache
from kvpilot.kernels.triton.paged_attention import paged_attention_decode, paged_attention_prefill
from kvpilot.kernels.triton.quant_matmul import int4_linear, int8_linear

Cache = torch.Tensor | KVCache


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: Cache, v_cache: Cache, slot_mapping) -> None:
    (k_data, k_scales, kv_cache_dtype), (v_data, v_scales, _) = _parts(k_cache), _parts(v_cache)
    reshape_and_cache(k, v, k_data, v_data, slot_mapping, kv_cache_dtype, k_scales, v_scales)


def paged_attention(
    q: torch.Tensor, k_cache: Cache, v_cache: Cache, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    (k_data, k_scales, kv_cache_dtype), (v_data, v_scales, _) = _parts(k_cache), _parts(v_cache)
    if metadata.max_query_len == 1:
        return paged_attention_decode(
            q,
            k_data,
            v_data,
            metadata.block_tables,
            metadata.seq_lens,
            scale,
            kv_cache_dtype,
            k_scales,
            v_scales,
        )
    return paged_attention_prefill(
        q, k_data, v_data, metadata.block_tables, metadata.query_start_loc, metadata.seq_lens,
        metadata.max_query_len, scale, kv_cache_dtype, k_scales, v_scales,
    )  # fmt: skip


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if isinstance(weight, Int4Weight):
        out = int4_linear(rows, weight)
    elif isinstance(weight, Int8Weight):
        out = int8_linear(rows, weight)
    else:  # fp8 is a storage format: expanded in row chunks, multiplied in the activation dtype
        out = weight.linear(rows)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _parts(cache: Cache) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    if isinstance(cache, KVCache):
        return cache.data, cache.scales, cache.kv_cache_dtype
    return cache, None, "auto"


TRITON_BACKEND = KernelBackend(
    "triton",
    write_kv_cache,
    paged_attention,
    quantized_linear,
    lambda weight: weight,  # cuBLAS takes it as is
    row_ops.rms_norm,
    row_ops.add_rms_norm,
    row_ops.silu_and_mul,
    row_ops.rotary,
    row_ops.argmax_rows,
)
