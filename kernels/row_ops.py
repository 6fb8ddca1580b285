"""RMSNorm (optionally after the residual add) and SiLU-and-multiply, the row-wise ops of a
decoder layer: one native pass per row on CPU (`csrc/row_ops.c`), torch elsewhere.

On CPU torch spends several ops (and passes over the rows) on each: a float32 RMSNorm is
pow, mean, add, rsqrt and two multiplies, and SiLU-and-multiply reads the gate and up halves
through strided views. At decode sizes the ops' dispatch costs more than their arithmetic.
"""

import torch
import torch.nn.functional as F
from kvpilot.kernels import cpu_extension


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place: x is the residual stream), then x's RMSNorm."""
    return rms_norm(x.add_(delta), weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2n] (gate and up side by side) -> silu(gate) * up, [..., n]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if cpu_extension.supports_rows(x, weight):
        return cpu_extension.rms_norm(x, weight, eps)
    return rms_norm(x, weight, eps)


def add_rms_norm_cpu(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if cpu_extension.supports_rows(x, weight) and cpu_extension.supports_rows(delta, weight):
        return cpu_extension.add_rms_norm(x, delta, weight, eps)
    return add_rms_norm(x, delta, weight, eps)


def silu_and_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.dim() == 2 and gate_up.is_contiguous() and cpu_extension.supports_rows(gate_up):
        return cpu_extension.silu_and_mul(gate_up)
    return silu_and_mul(gate_up)
