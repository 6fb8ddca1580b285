"""int8 weights: symmetric, one scale per output channel (or per group of input columns).

Per-channel weights on CPU live only inside fbgemm's prepacked form and run through
`torch.ops.quantized.linear_dynamic`; grouped weights (GGUF Q8_0: 32 columns per scale) are
dequantized a few rows at a time.
"""

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from kvpilot.kernels.quant.cpu_ops import flatten_tokens, linear_by_row_chunks

QMAX = 127
# Activations are fed to fbgemm in two int7 halves (see `_fbgemm_linear`): value = hi + lo / LO_SCALE.
HI_LEVELS = 63
LO_SCALE = 2 * HI_LEVELS
# fbgemm slows down super-linearly on tall inputs; rows are independent, so split them.
FBGEMM_ROWS_PER_CALL = 128


@dataclass(eq=False)
class Int8Weight:
    scales: torch.Tensor  # float32 [out, num_groups]
    group_size: int  # == in_features for per-output-channel scales
    stored: torch.Tensor | None  # int8 [out, in]; None when the weight lives in `packed`
    packed: Any = None  # fbgemm prepacked per-channel weight (CPU)

    @classmethod
    def from_int8(cls, qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None):
        """Wrap int8 values and float scales [out, in / group_size]; group_size None = per channel."""
        out, in_features = qweight.shape
        group_size = group_size or in_features
        if qweight.dtype != torch.int8:
            raise ValueError(f"qweight: must be int8, got {qweight.dtype}")
        if in_features % group_size:
            raise ValueError(f"group_size: {group_size} does not divide in_features {in_features}")
        if scales.shape != (out, in_features // group_size):
            expected = [out, in_features // group_size]
            raise ValueError(f"scales: must be {expected}, got {list(scales.shape)}")
        scales = scales.float()
        fbgemm_ok = in_features > 1 and qweight.device.type == "cpu" and int(qweight.min()) >= -QMAX
        if group_size == in_features and fbgemm_ok:
            return cls(scales, group_size, None, _prepack(qweight, scales[:, 0]))
        return cls(scales, group_size, qweight, None)

    @property
    def qweight(self) -> torch.Tensor:
        if self.stored is not None:
            return self.stored
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scales.shape[0], self.scales.shape[1] * self.group_size)

    @property
    def nbytes(self) -> int:
        out, in_features = self.shape
        return out * in_features + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize(self.qweight, self.scales, self.group_size).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = flatten_tokens(x)
        if self.packed is not None:
            parts = [_fbgemm_linear(rows, self.packed) for rows in x2.float().split(FBGEMM_ROWS_PER_CALL)]
            y = torch.cat(parts).to(x.dtype)
        else:
            q, s, g = self.stored, self.scales, self.group_size
            y = linear_by_row_chunks(
                x2, self.shape[0], self.shape[1], lambda a, b: _dequantize(q[a:b], s[a:b], g).to(x.dtype)
            )
        return y.reshape(*lead, self.shape[0])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.select_rows(token_ids.reshape(-1)).dequantize().reshape(*token_ids.shape, self.shape[1])

    def to(self, device: torch.device | str) -> "Int8Weight":
        """On CUDA the int8 values are kept as they are (Triton reads them); on CPU they are packed."""
        return Int8Weight.from_int8(self.qweight.to(device), self.scales.to(device), self.group_size)

    def select_rows(self, index: torch.Tensor) -> "Int8Weight":
        return Int8Weight.from_int8(self.qweight[index], self.scales[index], self.group_size)


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> Int8Weight:
    """Round-to-nearest symmetric int8; one scale per output channel unless group_size is given."""
    out, in_features = weight.shape
    group_size = group_size or in_features
    if in_features % group_size:
        raise ValueError(f"group_size: {group_size} does not divide in_features {in_features}")
    groups = weight.detach().float().view(out, -1, group_size)
    scales = groups.abs().amax(-1) / QMAX
    inverse = torch.where(scales == 0, 0.0, 1.0 / scales)
    q = (groups * inverse[..., None]).round().clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8Weight.from_int8(q.view(out, in_features), scales, group_size)


def _dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    rows = q.shape[0]
    return (q.view(rows, -1, group_size).float() * scales[..., None]).view(rows, -1)


def _prepack(qweight: torch.Tensor, scales: torch.Tensor) -> Any:
    zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized-tensor constructors warn about future deprecation
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(q, None)


def _fbgemm_linear(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """Weight-int8 linear with (almost) float activations, independent of the other rows in x.

    fbgemm's dynamic linear quantizes the whole input with one 7-bit scale, which would make a
    token's output depend on its batch neighbours and lose precision to outlier channels. So each
    row is scaled to [-63, 63] and split into two integer parts, x = max|x| / 63 * (hi + lo / 126),
    and an anchor row pins fbgemm's range to [-64, 63] (scale 1, zero point 64): both parts pass
    through losslessly, and the result matches the float-activation product to ~1e-4 relative,
    whatever else is in the batch.
    """
    tokens = x.shape[0]
    unit = x.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny).div_(HI_LEVELS)
    scaled = x / unit
    hi = scaled.round()
    lo = scaled.sub_(hi).mul_(LO_SCALE).round_()
    y = torch.ops.quantized.linear_dynamic(torch.cat([hi, lo, _anchor_row(x.shape[1])]), packed, True)
    return y[:tokens].add_(y[tokens : 2 * tokens], alpha=1 / LO_SCALE).mul_(unit)


@functools.cache
def _anchor_row(in_features: int) -> torch.Tensor:
    anchor = torch.zeros(1, in_features)
    anchor[0, 0], anchor[0, -1] = -(HI_LEVELS + 1), HI_LEVELS
    return anchor
