"""Weight-only quantized matmul: y = x @ dequantize(W)^T with W int8 (per-channel or grouped
scales) or int4 (kvpilot's packed GGML-order layout, float16 scales and mins), dequantized tile
by tile in registers; accumulation in float32."""

import torch
import triton
import triton.language as tl
from kvpilot.kernels.quant.int4 import PACK_COLUMNS, Int4Weight
from kvpilot.kernels.quant.int8 import Int8Weight

HALF = PACK_COLUMNS // 2


@triton.jit
def _int4_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    mins_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HALF_CHUNK: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF_CHUNK)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, 2 * HALF_CHUNK):  # one packing chunk: byte j = column j (low), j + 16 (high)
        packed = tl.load(
            qweight_ptr + offs_n[:, None] * stride_qn + k0 // 2 + offs_h[None, :],
            mask=n_mask[:, None],
            other=0,
        )
        group = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)
        low = tl.load(mins_ptr + offs_n * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)
        w_lo = (packed & 0xF).to(tl.float32) * scale[:, None] + low[:, None]
        w_hi = (packed >> 4).to(tl.float32) * scale[:, None] + low[:, None]
        cols = k0 + offs_h
        x_lo = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
            mask=m_mask[:, None] & (cols < K)[None, :],
            other=0.0,
        ).to(tl.float32)
        x_hi = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (cols + HALF_CHUNK)[None, :],
            mask=m_mask[:, None] & (cols + HALF_CHUNK < K)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(x_lo, tl.trans(w_lo)) + tl.dot(x_hi, tl.trans(w_hi))
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _int8_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides GROUP_SIZE: a tile never straddles two groups
        cols = k0 + offs_k
        k_mask = cols < K
        q = tl.load(
            qweight_ptr + offs_n[:, None] * stride_qn + cols[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0,
        )
        scale = tl.load(scales_ptr + offs_n * stride_sn + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
        w = q.to(tl.float32) * scale[:, None]
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(x, tl.trans(w))
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def int4_linear(x: torch.Tensor, weight: Int4Weight, block_m: int = 16, block_n: int = 32) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype."""
    x = x.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_kernel[grid](
        x, weight.qweight, weight.scales, weight.mins, out, m, n, k,
        x.stride(0), weight.qweight.stride(0), weight.scales.stride(0), out.stride(0),
        GROUP_SIZE=weight.group_size, BLOCK_M=block_m, BLOCK_N=block_n, HALF_CHUNK=HALF,
    )  # fmt: skip
    return out


def int8_linear(x: torch.Tensor, weight: Int8Weight, block_m: int = 16, block_n: int = 32) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype (W keeps its int8 values; per-channel or grouped)."""
    x = x.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    qweight, scales = weight.qweight.contiguous(), weight.scales.contiguous()
    block_k = 32 if weight.group_size % 32 == 0 else triton.next_power_of_2(min(weight.group_size, 32))
    if weight.group_size % block_k and weight.group_size != k:
        raise ValueError(f"group_size: {weight.group_size} is not a multiple of {block_k}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_kernel[grid](
        x, qweight, scales, out, m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=weight.group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out
