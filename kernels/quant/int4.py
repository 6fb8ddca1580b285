"""int4 weights: group-wise asymmetric (w = q * scale + min, q in 0..15), two values per byte.

Layout (GGML's Q4 order, so GGUF Q4_0/Q4_1 blocks convert by copying bytes): the columns are
cut into 32-column chunks; byte j of a chunk holds column j in its low nibble and column j + 16
in its high nibble. `qweight` is uint8 [out, padded_in / 2]; `scales` and `mins` are float16
[out, num_groups]. When in_features is not a multiple of the group size the last group is
padded (padding columns are stored but never used).
"""

from dataclasses import dataclass

import torch
from kvpilot.kernels.quant.cpu_ops import flatten_tokens, linear_by_row_chunks

PACK_COLUMNS = 32  # columns per packing chunk (two 16-byte halves)
GROUP_SIZES = (32, 64, 128)


@dataclass(eq=False)
class Int4Weight:
    qweight: torch.Tensor  # uint8 [out, padded_in // 2]
    scales: torch.Tensor  # float16 [out, num_groups]
    mins: torch.Tensor  # float16 [out, num_groups]
    in_features: int
    group_size: int

    def __post_init__(self) -> None:
        out, packed = self.qweight.shape
        if self.group_size % PACK_COLUMNS or self.group_size <= 0:
            raise ValueError(f"group_size: must be a positive multiple of {PACK_COLUMNS}")
        if packed * 2 != _padded(self.in_features, self.group_size):
            raise ValueError(f"qweight: {packed} bytes per row do not hold {self.in_features} columns")
        if self.scales.shape != (out, packed * 2 // self.group_size) or self.mins.shape != self.scales.shape:
            raise ValueError("scales/mins: must be [out_features, num_groups]")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.in_features)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequantize_rows(0, self.shape[0]).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T on CPU: 4-bit weights are expanded a few rows at a time, never all at once."""
        x2, lead = flatten_tokens(x)
        y = linear_by_row_chunks(
            x2, self.shape[0], self.qweight.shape[1] * 2, lambda a, b: self._dequantize_rows(a, b).to(x.dtype)
        )
        return y.reshape(*lead, self.shape[0])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.select_rows(token_ids.reshape(-1))
        return rows.dequantize().reshape(*token_ids.shape, self.in_features)

    def select_rows(self, index: torch.Tensor) -> "Int4Weight":
        return Int4Weight(
            self.qweight[index], self.scales[index], self.mins[index], self.in_features, self.group_size
        )

    @classmethod
    def concat_rows(cls, parts: list["Int4Weight"]) -> "Int4Weight | None":
        if len({(part.in_features, part.group_size) for part in parts}) != 1:
            return None
        qweight, scales, mins = (torch.cat(same) for same in zip(*(p.tensors() for p in parts), strict=True))
        return cls(qweight, scales, mins, parts[0].in_features, parts[0].group_size)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qweight, self.scales, self.mins

    def to(self, device: torch.device | str) -> "Int4Weight":
        moved = (t.to(device) for t in self.tensors())
        return Int4Weight(*moved, self.in_features, self.group_size)

    def _dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        q = unpack_int4(self.qweight[start:stop]).view(stop - start, self.scales.shape[1], self.group_size)
        q.mul_(self.scales[start:stop, :, None]).add_(self.mins[start:stop, :, None])  # as GGML: q*d + m
        return q.view(stop - start, -1)[:, : self.in_features]


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
    """Round-to-nearest asymmetric int4 per group of `group_size` input columns (GGML Q4_1 rule)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: must be one of {GROUP_SIZES}, got {group_size}")
    out, in_features = weight.shape
    w = weight.detach().float()
    pad = _padded(in_features, group_size) - in_features
    if pad:  # repeat the last column: the padded group keeps its min and max
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    groups = w.view(out, -1, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scales = ((hi - lo) / 15).half()
    mins = lo.half()
    inverse = torch.where(scales == 0, 0.0, 1.0 / scales.float())
    q = ((groups - mins.float()[..., None]) * inverse[..., None]).round().clamp_(0, 15).to(torch.uint8)
    return Int4Weight(pack_int4(q.view(out, -1)), scales, mins, in_features, group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [rows, cols] (cols a multiple of 32) -> [rows, cols / 2] in GGML order."""
    chunks = q.view(q.shape[0], -1, 2, PACK_COLUMNS // 2)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(q.shape[0], -1)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[rows, bytes] -> float32 [rows, 2 * bytes] of the 4-bit values (inverse of `pack_int4`)."""
    rows = packed.shape[0]
    halves = packed.view(rows, -1, PACK_COLUMNS // 2)
    out = torch.empty(rows, halves.shape[1], 2, PACK_COLUMNS // 2, device=packed.device)
    out[:, :, 0] = halves & 0x0F
    out[:, :, 1] = halves >> 4
    return out.view(rows, -1)


def _padded(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size
