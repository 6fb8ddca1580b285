"""GGUF Q8_0 / Q4_0 / Q4_1 blocks -> kvpilot formats, byte for byte, never through float.

Block layouts (gguf-py `quants.py`, ggml-quants.c), 32 weights per block:
  Q8_0 (34 bytes): d: f16, qs: int8[32]                  w = d * q
  Q4_0 (18 bytes): d: f16, qs: u8[16]                    w = d * (q - 8)
  Q4_1 (20 bytes): d: f16, m: f16, qs: u8[16]            w = d * q + m
Q4 byte j holds weight j (low nibble) and weight j + 16 (high nibble): the same order as
`Int4Weight`, so the nibbles are copied as they are. Q4_0 becomes asymmetric int4 with
min = -8 * d (exact in float16).
"""

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
from kvpilot.kernels.quant.int4 import Int4Weight
from kvpilot.kernels.quant.int8 import Int8Weight

BLOCK_TYPES = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
# Which kvpilot format holds each block type exactly.
BLOCK_FORMAT = {
    GGMLQuantizationType.Q8_0: "int8",
    GGMLQuantizationType.Q4_0: "int4",
    GGMLQuantizationType.Q4_1: "int4",
}


def from_gguf_blocks(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]
) -> Int8Weight | Int4Weight:
    """Raw block bytes of a 2-D tensor ([out, in] in PyTorch order) -> an exact quantized weight."""
    if qtype not in BLOCK_TYPES:
        names = [t.name for t in BLOCK_TYPES]
        raise ValueError(f"{qtype.name}: not a block type kvpilot keeps quantized ({names})")
    out, in_features = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if in_features % block_size or raw.nbytes != out * in_features // block_size * type_size:
        raise ValueError(f"{qtype.name}: {raw.nbytes} bytes do not hold a [{out}, {in_features}] tensor")
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).reshape(out, -1, type_size)
    d = _f16(blocks[..., 0:2])
    if qtype == GGMLQuantizationType.Q8_0:
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(out, in_features)
        return Int8Weight.from_int8(q, d.float(), block_size)
    if qtype == GGMLQuantizationType.Q4_0:
        mins, nibbles = (d * -8).half(), blocks[..., 2:]
    else:
        mins, nibbles = _f16(blocks[..., 2:4]), blocks[..., 4:]
    return Int4Weight(nibbles.reshape(out, -1).contiguous(), d, mins, in_features, block_size)


def from_gguf_tensor(tensor: ReaderTensor) -> Int8Weight | Int4Weight:
    """A 2-D Q8_0/Q4_0/Q4_1 `gguf.ReaderTensor` (its shape is [in, out], GGML order)."""
    if len(tensor.shape) != 2:
        raise ValueError(f"{tensor.name}: expected a 2-D tensor, got shape {list(tensor.shape)}")
    in_features, out = (int(n) for n in tensor.shape)
    return from_gguf_blocks(tensor.data, tensor.tensor_type, (out, in_features))


def _f16(two_bytes: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian bytes -> float16 [...]."""
    return two_bytes.contiguous().view(torch.float16).squeeze(-1)
