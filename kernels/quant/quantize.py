"""`quantize(weight, mode)`: the one entry point from a float weight to a quantized format."""

import torch
from kvpilot.kernels.quant.fp8 import Fp8Weight, quantize_fp8
from kvpilot.kernels.quant.int4 import Int4Weight, quantize_int4
from kvpilot.kernels.quant.int8 import Int8Weight, quantize_int8
from kvpilot.serving.contract import QUANTIZATION_MODES

QuantizedWeight = Int8Weight | Int4Weight | Fp8Weight
# w8a8: int8 weights and per-token int8 activations
WEIGHT_MODES = tuple(mode for mode in QUANTIZATION_MODES if mode != "none")
DEFAULT_GROUP_SIZE = 32  # int4; equals GGUF's Q4 block, so Q4_0/Q4_1 tensors load exactly


def quantize(weight: torch.Tensor, mode: str, group_size: int | None = None) -> QuantizedWeight:
    """Quantize a float [out, in] weight. group_size applies to int4 (default 32) and int8/w8a8
    (default: one scale per output channel); fp8 always uses per-channel scales."""
    if weight.dim() != 2 or not weight.is_floating_point():
        got = f"{weight.dtype} {list(weight.shape)}"
        raise ValueError(f"weight: expected a float [out, in] matrix, got {got}")
    if mode in ("int8", "w8a8"):
        return quantize_int8(weight, group_size, int8_activations=mode == "w8a8")
    if mode == "int4":
        return quantize_int4(weight, group_size or DEFAULT_GROUP_SIZE)
    if mode == "fp8":
        if group_size is not None:
            raise ValueError("group_size: fp8 uses per-channel scales")
        return quantize_fp8(weight)
    raise ValueError(f"quantization: unknown mode {mode!r}, expected one of {WEIGHT_MODES}")
