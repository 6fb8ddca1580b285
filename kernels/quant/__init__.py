"""Quantized weight formats (int8, int4, fp8, GGUF blocks) and quantized KV-cache helpers.

Every weight format keeps its data quantized in memory and exposes `shape`, `nbytes`,
`dequantize()` (the reference), `linear(x)` (x @ W^T, the fast CPU path), `embed(token_ids)`,
`select_rows(index)`, `concat_rows(parts)` (a classmethod; None when the parts' layouts differ)
and `to(device)`. The engine reaches the kernels through
`kvpilot.kernels.backend.select_backend` (Triton for CUDA tensors).
"""

from kvpilot.kernels.quant.fp8 import Fp8Weight, quantize_fp8
from kvpilot.kernels.quant.gguf_blocks import BLOCK_FORMAT, from_gguf_blocks, from_gguf_tensor
from kvpilot.kernels.quant.int4 import Int4Weight, quantize_int4
from kvpilot.kernels.quant.int8 import Int8Weight, quantize_int8
from kvpilot.kernels.quant.quantize import DEFAULT_GROUP_SIZE, WEIGHT_MODES, QuantizedWeight, quantize

__all__ = [
    "BLOCK_FORMAT",
    "DEFAULT_GROUP_SIZE",
    "WEIGHT_MODES",
    "Fp8Weight",
    "Int4Weight",
    "Int8Weight",
    "QuantizedWeight",
    "from_gguf_blocks",
    "from_gguf_tensor",
    "quantize",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
]
