"""Fused KV-cache write: scatter new tokens' K and V to their slots, quantizing on the way."""

import torch
import triton
import triton.language as tl
from kvpilot.kernels.triton.common import INT8_MAX, KV_INT8, kv_code, round_half_even, round_to_e4m3


@triton.jit
def _write_one(
    src_ptr,
    cache_ptr,
    scale_ptr,
    token,
    block,
    offset,
    stride_src_t,
    stride_src_h,
    stride_b,
    stride_t,
    stride_h,
    scale_stride_b,
    scale_stride_t,
    offs_h,
    offs_d,
    num_heads,
    mask,
    KV_QUANT: tl.constexpr,
):
    x = tl.load(
        src_ptr + token * stride_src_t + offs_h[:, None] * stride_src_h + offs_d[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    dst = cache_ptr + block * stride_b + offset * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    if KV_QUANT == 1:  # int8, one symmetric scale per token per head
        scale = tl.max(tl.abs(x), axis=1) / INT8_MAX
        inverse = tl.where(scale == 0.0, 0.0, 1.0 / scale)
        q = tl.minimum(tl.maximum(round_half_even(x * inverse[:, None]), -INT8_MAX), INT8_MAX)
        tl.store(dst, q.to(tl.int8), mask=mask)
        tl.store(
            scale_ptr + block * scale_stride_b + offset * scale_stride_t + offs_h,
            scale,
            mask=offs_h < num_heads,
        )
    elif KV_QUANT == 2:  # fp8 e4m3, saturated at +-448
        tl.store(dst, round_to_e4m3(x).to(cache_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slot_mapping_ptr,
    stride_src_t,
    stride_src_h,
    stride_b,
    stride_t,
    stride_h,
    scale_stride_b,
    scale_stride_t,
    num_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:  # slot -1 marks a padding token
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < head_dim)
        _write_one(
            key_ptr,
            k_cache_ptr,
            k_scale_ptr,
            token,
            block,
            offset,
            stride_src_t,
            stride_src_h,
            stride_b,
            stride_t,
            stride_h,
            scale_stride_b,
            scale_stride_t,
            offs_h,
            offs_d,
            num_heads,
            mask,
            KV_QUANT,
        )
        _write_one(
            value_ptr,
            v_cache_ptr,
            v_scale_ptr,
            token,
            block,
            offset,
            stride_src_t,
            stride_src_h,
            stride_b,
            stride_t,
            stride_h,
            scale_stride_b,
            scale_stride_t,
            offs_h,
            offs_d,
            num_heads,
            mask,
            KV_QUANT,
        )


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """key/value [T, num_kv_heads, head_dim] -> caches [num_blocks, block_size, num_kv_heads, head_dim]
    at slot_mapping [T] (-1 = skip); int8 also writes scales [num_blocks, block_size, num_kv_heads]."""
    code = kv_code(kv_cache_dtype)
    if code == KV_INT8 and (k_scale is None or v_scale is None):
        raise ValueError("k_scale/v_scale: required for kv_cache_dtype int8")
    if key.stride(-1) != 1 or value.stride() != key.stride() or k_cache.stride() != v_cache.stride():
        raise ValueError("key/value and k_cache/v_cache: must share strides with unit-stride head_dim")
    num_tokens, num_heads, head_dim = key.shape
    scales = (k_scale, v_scale) if code == KV_INT8 else (k_cache, v_cache)  # unused pointers otherwise
    scale_strides = (scales[0].stride(0), scales[0].stride(1))
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, scales[0], scales[1], slot_mapping,
        key.stride(0), key.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *scale_strides, num_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), KV_QUANT=code,
    )  # fmt: skip
