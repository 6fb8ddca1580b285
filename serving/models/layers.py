"""Building blocks of the Llama family, as plain callables over already-loaded weights.

A weight is either a float tensor or a quantized-weight object (`kvpilot.kernels.quant`) that
offers the same operations: `linear(x)` (x @ W^T), `embed(token_ids)` and `nbytes`. Every
projection goes through `Linear` and every table through `Embedding`, so the weight format is
decided once, by the loader.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kvpilot.kernels.backend import select_backend
from kvpilot.kernels.quant.loading import concat_rows

Weight = torch.Tensor  # or any object with .linear(x), .embed(ids), .nbytes (quantized formats)


def weight_nbytes(weight) -> int:
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    return int(weight.nbytes)


class Linear:
    """x @ W^T (+ bias). A float weight is kept in the layout the device's matmul wants (on CPU,
    oneDNN's packed one), so `weight` is a tensor or an object with `.linear(x)`."""

    def __init__(self, weight: Weight, bias: torch.Tensor | None = None):
        if isinstance(weight, torch.Tensor):
            weight = select_backend(weight.device).prepare_linear_weight(weight)
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, torch.Tensor):
            return F.linear(x, self.weight, self.bias)
        out = select_backend(x.device).quantized_linear(x, self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias

    @property
    def nbytes(self) -> int:
        return weight_nbytes(self.weight) + (0 if self.bias is None else weight_nbytes(self.bias))


class MergedLinear:
    """Projections of the same input (q/k/v, gate/up) as one matmul, its output split back.

    Falls back to one matmul per projection when their formats cannot be concatenated.
    """

    def __init__(self, weights: list[Weight], biases: list[torch.Tensor] | None = None):
        self.sizes = [weight.shape[0] for weight in weights]
        biases = biases or [None] * len(weights)
        merged = concat_rows(weights)
        if merged is None:
            self.parts = [Linear(w, b) for w, b in zip(weights, biases, strict=True)]
        else:
            self.parts = [Linear(merged, None if biases[0] is None else torch.cat(biases))]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(self.parts) == 1:
            return self.parts[0](x).split(self.sizes, dim=-1)
        return tuple(part(x) for part in self.parts)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The projections side by side, [..., sum(sizes)] (one matmul's output when merged)."""
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([part(x) for part in self.parts], dim=-1)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


class Embedding:
    def __init__(self, weight: Weight, dtype: torch.dtype):
        self.weight = weight
        self.dtype = dtype

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, torch.Tensor):
            return F.embedding(token_ids, self.weight)
        return self.weight.embed(token_ids).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return weight_nbytes(self.weight)


class RMSNorm:
    """Normalizes in float32 and scales in the model dtype, the way transformers' Llama does."""

    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight = weight
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused pass, the same arithmetic as below
            return select_backend(x.device).rms_norm(x, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x += delta (x is the residual stream), then the norm of x; one pass in float32."""
        if x.dtype == torch.float32:
            return select_backend(x.device).add_rms_norm(x, delta, self.weight, self.eps)
        return self(x.add_(delta))

    @property
    def nbytes(self) -> int:
        return weight_nbytes(self.weight)


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Rotate-half RoPE with cos/sin precomputed for every position up to max_positions.

    `rotate_half(x) * sin` is computed as `swap_halves(x) * signed_sin` (sin with its first half
    negated): the same products, so the same bits, in fewer ops (one native pass on CPU).
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: RopeScaling | None,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        half = head_dim // 2
        self.cos = angles.cos().to(device, dtype)  # [max_positions, head_dim]
        self.sin = angles.sin().to(device, dtype)
        self.signed_sin = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)

    def __call__(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, dim] (any heads: q and k side by side) rotated by their positions [T]."""
        return select_backend(x.device).rotary(x, positions, self.cos, self.signed_sin)
