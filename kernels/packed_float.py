"""float32 weights pre-packed once for the fastest CPU matmul here.

`F.linear` on CPU goes to MKL's sgemm, which re-packs the weight on every call. Two packed
layouts replace the plain weight instead (no second copy; a tied head is the exception: the
embedding keeps the plain table):

- `PanelFloatWeight`, wherever kvpilot's own kernel builds (AVX2 + FMA and a C compiler): panels
  of 16 outputs (csrc/packed_sgemm.c), which stream each weight once per decode step, and the
  layout the native decode stack reads (serving/models/decode_stack.py). Over the default
  model's layers (30 distinct layers, weights cold, same run): on an AVX2-only Zen 2, 1.6x oneDNN
  at 1-8 rows, 1.4x at 16, ~1.1x at 64-128, par at 2048 (prefill); on a Zen 4, 1.2-1.6x at 1-16
  rows, 1.0-1.1x at 32-128. With full-width AVX-512 (an Intel Xeon, family 6 model 207, weights
  hot) the panels' 16-row zmm tile is par with oneDNN at 96-128 rows, 1.2-1.4x at 8-32, 0.9x at
  512-2048; the engine, which then runs its decode steps in the native stack, 1.15-1.28x fp32
  tokens/s (alternating runs of the bench workload, 309-314 against 241-273).
- `OnednnFloatWeight`, elsewhere: oneDNN's blocked layout, the path torch's compiler uses for
  frozen CPU linears; 1.3-2x `F.linear` at every batch size.

`KVPILOT_FLOAT_GEMM=onednn` (or `panels`) forces one, e.g. to compare them in the engine.
"""

import functools
import logging
import os
from dataclasses import dataclass

import torch
from kvpilot.kernels.quant.cpu_ops import flatten_tokens

GEMM_ENV = "KVPILOT_FLOAT_GEMM"
GEMMS = ("panels", "onednn")
PANEL_WIDTH = 16  # outputs per panel (csrc/packed_sgemm.c's NR)
logger = logging.getLogger(__name__)


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and (torch.backends.mkldnn.is_available() or float_gemm() == "panels")
    )


@functools.cache
def float_gemm() -> str:
    """'panels' where the panel kernel builds, else 'onednn', unless KVPILOT_FLOAT_GEMM forces one
    (forced panels still need the kernel)."""
    from kvpilot.kernels import cpu_extension

    forced = os.environ.get(GEMM_ENV, "")
    if forced and forced not in GEMMS:
        raise ValueError(f"{GEMM_ENV}: expected one of {', '.join(GEMMS)}, got {forced!r}")
    chosen = forced or "panels"
    if chosen == "panels" and not cpu_extension.supports_packed_sgemm():
        chosen = "onednn"
    logger.info("float32 linears: %s (CPU capability %s)", chosen, torch.backends.cpu.get_cpu_capability())
    return chosen


def pack_float_weight(weight: torch.Tensor) -> "PanelFloatWeight | OnednnFloatWeight":
    """The weight in the layout of this machine's float GEMM (`float_gemm`)."""
    if float_gemm() == "panels":
        return PanelFloatWeight.pack(weight)
    return OnednnFloatWeight.pack(weight)


def packed_float_weights(weight: torch.Tensor) -> list["PanelFloatWeight | OnednnFloatWeight"]:
    """The weight in every packed layout this machine can multiply (for benchmarks)."""
    from kvpilot.kernels import cpu_extension

    packed = [OnednnFloatWeight.pack(weight)] if torch.backends.mkldnn.is_available() else []
    return packed + ([PanelFloatWeight.pack(weight)] if cpu_extension.supports_packed_sgemm() else [])


def _check_packable(weight: torch.Tensor, backend: str) -> None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        raise ValueError(
            f"weight: {backend} packs float32 [out, in] CPU weights, got {weight.dtype} {weight.device}"
        )


@dataclass(eq=False)
class PanelFloatWeight:
    """A float32 [out, in] weight as [panels, in, 16]: `linear(x)` = x @ W^T."""

    panels: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "PanelFloatWeight":
        _check_packable(weight, "the panel GEMM")
        out_features, in_features = weight.shape
        padded = torch.nn.functional.pad(weight.detach(), (0, 0, 0, -out_features % PANEL_WIDTH))
        panels = padded.reshape(-1, PANEL_WIDTH, in_features).transpose(1, 2).contiguous()
        return cls(panels, (out_features, in_features))

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def dense(self) -> torch.Tensor:
        return self.panels.transpose(1, 2).reshape(-1, self.shape[1])[: self.shape[0]]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from kvpilot.kernels import cpu_extension

        x2, lead = flatten_tokens(x.float())
        y = cpu_extension.sgemm_packed(x2, self.panels, self.shape[0], bias)
        return y.reshape(*lead, self.shape[0]).to(x.dtype)


@dataclass(eq=False)
class OnednnFloatWeight:
    """A float32 [out, in] weight in oneDNN's layout: `linear(x)` = x @ W^T."""

    packed: torch.Tensor  # an opaque mkldnn tensor
    shape: tuple[int, int]

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "OnednnFloatWeight":
        _check_packable(weight, "oneDNN")
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
