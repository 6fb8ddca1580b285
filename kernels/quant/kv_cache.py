"""Quantized paged KV cache: storage dtypes, block sizing, quantize-on-write and dequantize-on-read.

Per layer, K and V are [num_blocks, block_size, num_kv_heads, head_dim] in the storage dtype;
int8 adds float32 scales [num_blocks, block_size, num_kv_heads] (one per token per head,
symmetric, amax / 127). fp8 stores e4m3 values directly (saturated to +-448; no scale, like
vLLM's default k_scale = v_scale = 1). A token's slot is
block_table[pos // block_size] * block_size + pos % block_size.

The values are indexed as [num_blocks, block_size, num_kv_heads, head_dim] but stored head-major
within a block ([num_blocks, num_kv_heads, block_size, head_dim], a transposed view): decode
attention reads one KV head's rows of a block as one contiguous run. With token-major rows
each head's pass read a third of every row, and the native float32 decode kernel ran 1.6x
slower on our Zen 2 (int8: 1.2x). Kernels take the strides, so any layout is correct.
"""

from dataclasses import dataclass

import torch
from kvpilot.kernels import huge_pages
from kvpilot.serving.contract import KV_CACHE_DTYPES

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
INT8_MAX = 127
SCALE_DTYPE = torch.float32


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "int8":
        return torch.int8
    if kv_cache_dtype == "fp8":
        return FP8_DTYPE
    raise ValueError(f"kv_cache_dtype: unknown {kv_cache_dtype!r}, expected one of {KV_CACHE_DTYPES}")


def kv_block_bytes(
    block_size: int, num_kv_heads: int, head_dim: int, kv_cache_dtype: str, model_dtype: torch.dtype
) -> int:
    """Bytes one KV block takes in one layer, K and V together, scales included."""
    storage = kv_storage_dtype(kv_cache_dtype, model_dtype)
    per_token_head = head_dim * storage.itemsize
    if kv_cache_dtype == "int8":
        per_token_head += SCALE_DTYPE.itemsize
    return 2 * block_size * num_kv_heads * per_token_head


def quantize_kv(x: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[..., head_dim] float -> (stored values, int8 scales [...] or None)."""
    if kv_cache_dtype == "int8":
        scales = x.abs().amax(dim=-1).float() / INT8_MAX
        inverse = torch.where(scales == 0, 0.0, 1.0 / scales)
        q = (x.float() * inverse[..., None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return q, scales
    if kv_cache_dtype == "fp8":
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} is not a quantized KV dtype")


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scales is None:
        return values.to(dtype)  # fp8 -> float is exact
    return (values.float() * scales[..., None]).to(dtype)


def kv_cache_tensor(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A zeroed [num_blocks, block_size, num_kv_heads, head_dim] cache stored head-major within a
    block (see the module docstring); in huge pages where the CPU offers them. Zeros, not empty:
    padded gathers read unused slots, and 0 * NaN garbage would be NaN."""
    stored = huge_pages.zeros((num_blocks, num_kv_heads, block_size, head_dim), dtype, device)
    return stored.transpose(1, 2)


def allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    kv_cache_dtype: str,
    model_dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> "torch.Tensor | KVCache":
    """One layer's K (or V) cache: a tensor in the model dtype ("auto"), else a `KVCache`."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if kv_cache_dtype == "auto":
        return kv_cache_tensor(*shape, model_dtype, device)
    return KVCache.allocate(*shape, kv_cache_dtype, model_dtype, device)


@dataclass(eq=False)
class KVCache:
    """One layer's K (or V) cache in its storage dtype, quantizing on write.

    Indexing by block ids, like a [num_blocks, block_size, num_kv_heads, head_dim] tensor,
    returns those blocks dequantized to float32, so gather-based attention reads it unchanged.
    """

    data: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], storage dtype (any strides)
    scales: torch.Tensor | None  # [num_blocks, block_size, num_kv_heads] for int8, else None
    kv_cache_dtype: str

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        kv_cache_dtype: str,
        model_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "KVCache":
        storage = kv_storage_dtype(kv_cache_dtype, model_dtype)
        data = kv_cache_tensor(num_blocks, block_size, num_kv_heads, head_dim, storage, device)
        scales_shape = (num_blocks, block_size, num_kv_heads)
        scales = huge_pages.zeros(scales_shape, SCALE_DTYPE, device) if kv_cache_dtype == "int8" else None
        return cls(data, scales, kv_cache_dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales) if t is not None)

    def write(self, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new tokens [T, num_kv_heads, head_dim] at their slots (quantize on write)."""
        blocks, offsets = split_slots(slot_mapping, self.data.shape[1])
        if self.kv_cache_dtype == "auto":
            self.data[blocks, offsets] = x.to(self.data.dtype)
            return
        values, scales = quantize_kv(x, self.kv_cache_dtype)
        _bytes_view(self.data)[blocks, offsets] = _bytes_view(values)
        if self.scales is not None:
            self.scales[blocks, offsets] = scales

    def read(self, slots: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[len(slots), num_kv_heads, head_dim] at the given slots, dequantized."""
        blocks, offsets = split_slots(slots, self.data.shape[1])
        values = _bytes_view(self.data)[blocks, offsets].view(self.data.dtype)
        scales = None if self.scales is None else self.scales[blocks, offsets]
        return dequantize_kv(values, scales, dtype)

    def __getitem__(self, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks [..., block_size, num_kv_heads, head_dim] by block id, dequantized to float32."""
        values = _bytes_view(self.data)[blocks].view(self.data.dtype)
        return dequantize_kv(values, None if self.scales is None else self.scales[blocks], torch.float32)


def split_slots(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots -> (block ids, offsets in the block), to index a cache of any layout."""
    return torch.div(slots, block_size, rounding_mode="floor"), slots % block_size


def _bytes_view(x: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8: CPU index_copy/index_select do not support float8 (same bytes)."""
    return x.view(torch.uint8) if x.dtype == FP8_DTYPE else x
