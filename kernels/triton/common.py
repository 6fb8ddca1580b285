"""Small jit helpers shared by the kernels, and KV quantization codes."""

import triton
import triton.language as tl

# KV storage codes passed to kernels as a constexpr (mirrors kvpilot.kernels.quant.kv_cache).
KV_FLOAT, KV_INT8, KV_FP8 = 0, 1, 2
KV_CODES = {"auto": KV_FLOAT, "int8": KV_INT8, "fp8": KV_FP8}
INT8_MAX = 127.0
FP8_MAX = 448.0


@triton.jit
def round_half_even(x):
    """torch.round's rounding (libdevice.rint is not available in the interpreter)."""
    r = tl.floor(x + 0.5)
    half = r * 0.5
    is_tie = (r - x) == 0.5
    return tl.where(is_tie & (tl.floor(half) != half), r - 1.0, r)


@triton.jit
def round_to_e4m3(x):
    """Round float32 to the nearest float8 e4m3 value (ties to even), saturating at +-448.

    Done in float32 so the final cast is exact: the interpreter's own float8 cast truncates.
    """
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)  # e4m3 subnormals share the smallest exponent
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    return round_half_even(x / step) * step


@triton.jit
def load_kv_tile(
    cache_ptr,
    scale_ptr,
    block,
    offs_tok,
    kv_head,
    offs_d,
    mask,
    stride_b,
    stride_t,
    stride_h,
    scale_stride_b,
    scale_stride_t,
    KV_QUANT: tl.constexpr,
):
    """One block's K or V for one head: [block_size, BLOCK_D] float32, dequantized."""
    ptrs = cache_ptr + block * stride_b + offs_tok[:, None] * stride_t + kv_head * stride_h + offs_d[None, :]
    tile = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if KV_QUANT == 1:
        scales = tl.load(scale_ptr + block * scale_stride_b + offs_tok * scale_stride_t + kv_head)
        tile = tile * scales[:, None]
    return tile


def kv_code(kv_cache_dtype: str) -> int:
    if kv_cache_dtype not in KV_CODES:
        raise ValueError(f"kv_cache_dtype: unknown {kv_cache_dtype!r}, expected one of {tuple(KV_CODES)}")
    return KV_CODES[kv_cache_dtype]
