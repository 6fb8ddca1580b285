"""float32 weights pre-packed once for oneDNN's CPU matmul.

`F.linear` on CPU goes to MKL's sgemm, which re-packs the weight on every call; oneDNN takes the
weight already in its blocked layout (the path torch's compiler uses for frozen CPU linears). On
the default model's shapes that is 1.3-2x the throughput of `F.linear` at every batch size, and
the packed copy replaces the plain one, so it costs no memory (a tied head is the exception:
the embedding keeps the plain table).
"""

from dataclasses import dataclass

import torch
from kvpilot.kernels.quant.cpu_ops import flatten_tokens


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
    )


@dataclass(eq=False)
class PackedFloatWeight:
    """A float32 [out, in] weight in oneDNN's layout: `linear(x)` = x @ W^T."""

    packed: torch.Tensor  # an opaque mkldnn tensor
    shape: tuple[int, int]

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "PackedFloatWeight":
        if not can_pack(weight):
            raise ValueError(
                f"weight: oneDNN packs float32 [out, in] CPU weights, got {weight.dtype} {weight.device}"
            )
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        return cls(packed, tuple(weight.shape))

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def dense(self) -> torch.Tensor:
        return self.packed.to_dense()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2, lead = flatten_tokens(x.float().contiguous())
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, bias, "none", [], "")
        return y.reshape(*lead, self.shape[0]).to(x.dtype)
