"""Paged attention over a block-table KV cache: decode (one query per sequence) and prefill
(a chunk of queries per sequence attending causally to everything cached so far).

Caches are [num_blocks, block_size, num_kv_heads, head_dim] (float, int8 with per-token-per-head
scales [num_blocks, block_size, num_kv_heads], or fp8); the chunk's own K/V must already be
written. Softmax is the online (flash) form in float32.
"""

import torch
import triton
import triton.language as tl
from kvpilot.kernels.triton.common import KV_INT8, kv_code, load_kv_tile


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    sm_scale,
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_bt,
    stride_b,
    stride_t,
    stride_h,
    scale_stride_b,
    scale_stride_t,
    head_dim,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // QUERIES_PER_KV
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_SIZE)
    d_mask = offs_d < head_dim
    q = tl.load(q_ptr + seq * stride_qs + head * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    seq_len = tl.load(seq_lens_ptr + seq)
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.cdiv(seq_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt + j)
        valid = j * BLOCK_SIZE + offs_t < seq_len
        mask = valid[:, None] & d_mask[None, :]
        k = load_kv_tile(
            k_cache_ptr,
            k_scale_ptr,
            block,
            offs_t,
            kv_head,
            offs_d,
            mask,
            stride_b,
            stride_t,
            stride_h,
            scale_stride_b,
            scale_stride_t,
            KV_QUANT,
        )
        v = load_kv_tile(
            v_cache_ptr,
            v_scale_ptr,
            block,
            offs_t,
            kv_head,
            offs_d,
            mask,
            stride_b,
            stride_t,
            stride_h,
            scale_stride_b,
            scale_stride_t,
            KV_QUANT,
        )
        scores = tl.where(valid, tl.sum(k * q[None, :], axis=1) * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(
        out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask
    )


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    sm_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_b,
    stride_t,
    stride_h,
    scale_stride_b,
    scale_stride_t,
    head_dim,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // QUERIES_PER_KV
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - query_len  # absolute position of the chunk's first query
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_SIZE)
    m_valid = offs_m < query_len
    d_mask = offs_d < head_dim
    q_pos = first_pos + offs_m
    q_ptrs = q_ptr + (query_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    last_key = tl.minimum(seq_len, first_pos + (tile + 1) * BLOCK_M)  # causal: later keys are unused
    for j in range(0, tl.cdiv(last_key, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt + j)
        k_pos = j * BLOCK_SIZE + offs_t
        kv_mask = (k_pos < seq_len)[:, None] & d_mask[None, :]
        k = load_kv_tile(
            k_cache_ptr,
            k_scale_ptr,
            block,
            offs_t,
            kv_head,
            offs_d,
            kv_mask,
            stride_b,
            stride_t,
            stride_h,
            scale_stride_b,
            scale_stride_t,
            KV_QUANT,
        )
        v = load_kv_tile(
            v_cache_ptr,
            v_scale_ptr,
            block,
            offs_t,
            kv_head,
            offs_d,
            kv_mask,
            stride_b,
            stride_t,
            stride_h,
            scale_stride_b,
            scale_stride_t,
            KV_QUANT,
        )
        scores = tl.dot(q, tl.trans(k)) * sm_scale
        causal = (k_pos[None, :] <= q_pos[:, None]) & (k_pos < seq_len)[None, :]
        scores = tl.where(causal, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past the chunk see no keys
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + (query_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


def paged_attention_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [num_seqs, num_heads, head_dim], one token per sequence at position seq_lens - 1."""
    code, scales, out = _prepare(query, k_cache, v_cache, kv_cache_dtype, k_scale, v_scale)
    num_seqs, num_heads, head_dim = query.shape
    _decode_kernel[(num_seqs, num_heads)](
        query, k_cache, v_cache, scales[0], scales[1], block_tables, seq_lens, out, scale,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scales[0].stride(0), scales[0].stride(1),
        head_dim, QUERIES_PER_KV=num_heads // k_cache.shape[2], BLOCK_SIZE=k_cache.shape[1],
        BLOCK_D=triton.next_power_of_2(head_dim), KV_QUANT=code,
    )  # fmt: skip
    return out


def paged_attention_prefill(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_m: int = 16,
) -> torch.Tensor:
    """query [total_tokens, num_heads, head_dim]: sequence s owns rows query_start_loc[s]:[s + 1], the
    last of its seq_lens[s] tokens (prefill chunks and decodes may be mixed)."""
    code, scales, out = _prepare(query, k_cache, v_cache, kv_cache_dtype, k_scale, v_scale)
    num_heads, head_dim = query.shape[1:]
    grid = (seq_lens.shape[0], triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, scales[0], scales[1], block_tables, query_start_loc, seq_lens, out, scale,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scales[0].stride(0), scales[0].stride(1),
        head_dim, QUERIES_PER_KV=num_heads // k_cache.shape[2], BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m,
        BLOCK_D=triton.next_power_of_2(head_dim), KV_QUANT=code,
    )  # fmt: skip
    return out


def _prepare(query, k_cache, v_cache, kv_cache_dtype, k_scale, v_scale):
    code = kv_code(kv_cache_dtype)
    if code == KV_INT8 and (k_scale is None or v_scale is None):
        raise ValueError("k_scale/v_scale: required for kv_cache_dtype int8")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("k_cache/v_cache/query: need equal cache strides and unit-stride head_dim")
    if query.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num_heads {query.shape[1]} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    block_size = k_cache.shape[1]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size: the Triton kernels need a power of two >= 16, got {block_size}")
    scales = (k_scale, v_scale) if code == KV_INT8 else (k_cache, v_cache)  # unused pointers otherwise
    return code, scales, torch.empty_like(query)
