"""Quantized KV cache: block sizing, quantize-on-write at slots, dequantize-on-read."""

import pytest
import torch
from kvpilot.kernels.quant.kv_cache import (
    KVCache,
    dequantize_kv,
    kv_block_bytes,
    quantize_kv,
)

BLOCK, HEADS, DIM = 16, 3, 64


def test_block_bytes_arithmetic():
    assert kv_block_bytes(BLOCK, HEADS, DIM, "auto", torch.float32) == 2 * BLOCK * HEADS * DIM * 4
    assert kv_block_bytes(BLOCK, HEADS, DIM, "auto", torch.bfloat16) == 2 * BLOCK * HEADS * DIM * 2
    assert kv_block_bytes(BLOCK, HEADS, DIM, "int8", torch.float32) == 2 * BLOCK * HEADS * (DIM + 4)
    assert kv_block_bytes(BLOCK, HEADS, DIM, "fp8", torch.float32) == 2 * BLOCK * HEADS * DIM
    key, value = (KVCache.allocate(5, BLOCK, HEADS, DIM, "int8") for _ in range(2))
    assert key.nbytes + value.nbytes == 5 * kv_block_bytes(BLOCK, HEADS, DIM, "int8", torch.float32)


def test_int8_and_fp8_fit_about_four_times_the_float32_blocks():
    budget, layers = 64 << 20, 30
    blocks = {
        dtype: budget // (layers * kv_block_bytes(BLOCK, HEADS, DIM, dtype, torch.float32))
        for dtype in ("auto", "int8", "fp8")
    }
    assert blocks["auto"] == budget // (layers * 2 * BLOCK * HEADS * DIM * 4)
    assert blocks["int8"] >= 3.7 * blocks["auto"]
    assert blocks["fp8"] >= 4 * blocks["auto"]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_write_then_read_at_slots_and_by_block(kv_cache_dtype):
    cache = KVCache.allocate(4, 4, 2, 8, kv_cache_dtype)
    want = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(0)) * 3
    slots = torch.tensor([13, 2, 7, 0, 15])  # slot = block * block_size + offset
    cache.write(want, slots)
    got = cache.read(slots)
    if kv_cache_dtype == "auto":
        assert torch.equal(got, want)
    elif kv_cache_dtype == "int8":
        step = want.abs().amax(-1, keepdim=True) / 127
        assert ((got - want).abs() <= step / 2 + 1e-6).all()
    else:
        assert ((got - want).abs() <= want.abs() / 16 + 2**-10).all()
    untouched = torch.tensor([s for s in range(16) if s not in slots.tolist()])
    assert not cache.read(untouched).any()
    blocks = cache[torch.tensor([[3, 0]])]  # like indexing a cache tensor with a block table
    assert blocks.shape == (1, 2, 4, 2, 8) and blocks.dtype == torch.float32
    assert torch.equal(blocks[0, 0, 1], got[0]) and torch.equal(blocks[0, 1, 0], got[3])


def test_int8_scales_are_per_token_per_head():
    x = torch.tensor([[[1.0, -2.0], [0.0, 0.0]], [[100.0, 50.0], [0.5, -0.25]]])  # [T=2, H=2, D=2]
    q, scales = quantize_kv(x, "int8")
    assert q.dtype == torch.int8 and scales.shape == (2, 2)
    assert torch.allclose(scales, torch.tensor([[2 / 127, 0.0], [100 / 127, 0.5 / 127]]))
    assert torch.allclose(dequantize_kv(q, scales, torch.float32), x, atol=0.4)
    assert q[1, 0, 0] == 127 and q[0, 0, 1] == -127


def test_fp8_saturates_instead_of_overflowing():
    q, scales = quantize_kv(torch.tensor([1000.0, -1000.0, 1.0]), "fp8")
    assert scales is None
    assert dequantize_kv(q, None, torch.float32).tolist() == [448.0, -448.0, 1.0]


def test_unknown_kv_cache_dtype_names_the_field():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_block_bytes(BLOCK, HEADS, DIM, "int4", torch.float32)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVCache.allocate(1, BLOCK, HEADS, DIM, "fp16")
