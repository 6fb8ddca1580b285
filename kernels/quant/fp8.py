"""fp8 weights: float8 e4m3 storage with one float32 scale per output channel.

fp8 is a storage format here: CPUs (and GPUs before Hopper/Ada) have no fp8 matmul, so
`linear` expands a few rows at a time to the activation dtype and multiplies in that dtype.
"""

from dataclasses import dataclass

import torch
from kvpilot.kernels.quant.cpu_ops import flatten_tokens, linear_by_row_chunks

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


@dataclass(eq=False)
class Fp8Weight:
    weight: torch.Tensor  # float8_e4m3fn [out, in]
    scales: torch.Tensor  # float32 [out]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequantize_rows(0, self.shape[0]).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = flatten_tokens(x)
        y = linear_by_row_chunks(
            x2, self.shape[0], self.shape[1], lambda a, b: self._dequantize_rows(a, b).to(x.dtype)
        )
        return y.reshape(*lead, self.shape[0])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.select_rows(token_ids.reshape(-1)).dequantize().reshape(*token_ids.shape, self.shape[1])

    def select_rows(self, index: torch.Tensor) -> "Fp8Weight":
        return Fp8Weight(self.weight[index], self.scales[index])

    @classmethod
    def concat_rows(cls, parts: list["Fp8Weight"]) -> "Fp8Weight":
        return cls(torch.cat([part.weight for part in parts]), torch.cat([part.scales for part in parts]))

    def to(self, device: torch.device | str) -> "Fp8Weight":
        return Fp8Weight(self.weight.to(device), self.scales.to(device))

    def _dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.weight[start:stop].float().mul_(self.scales[start:stop, None])


def quantize_fp8(weight: torch.Tensor) -> Fp8Weight:
    """Scale each output channel so its largest magnitude maps to e4m3's max (448), then round."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / FP8_MAX
    inverse = torch.where(scales == 0, 0.0, 1.0 / scales)
    return Fp8Weight((w * inverse[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales)
