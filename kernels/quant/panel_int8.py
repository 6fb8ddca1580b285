"""Per-channel int8 weights packed for kvpilot's own int8 kernel (csrc/packed_int8.c).

One byte buffer holds a header (how activations are quantized: per token to int8 for W8A8, or
in two exact 7-bit parts for weight-only int8), the float32 scales, the int32 column sums the
VNNI kernel subtracts (128 per unit of weight: it takes activations as unsigned q + 128) and the
int8 values in panels of 16 outputs by groups of 4 inputs, `vpdpbusd`'s lane layout (the AVX2
kernel widens a group's 4 x 4 bytes to `vpmaddwd`'s int16 pairs as it loads them). It is the
per-channel int8 layout wherever the kernel is compiled in (AVX-512 VNNI or AVX2,
`cpu_extension.supports_int8_panels`), and the one the native decode stack reads, so quantized
decode steps run there too (serving/models/decode_stack.py).
"""

from dataclasses import dataclass

import torch
from kvpilot.kernels.quant.cpu_ops import flatten_tokens

PANEL_WIDTH = 16  # outputs per panel (csrc/packed_int8.c's NR)
GROUP = 4  # inputs per `vpdpbusd` lane
HEADER_BYTES = 64  # int32 activation parts: 1 (W8A8) or 2 (exact), then padding
ACTIVATION_OFFSET = 128  # VNNI takes activations as q + 128 (unsigned)


@dataclass(eq=False)
class PanelInt8:
    """An int8 [out, in] weight with per-output scales: `linear(x)` quantizes x per token."""

    buffer: torch.Tensor  # uint8: header, scales, sums, panels (csrc/packed_int8.c)
    shape: tuple[int, int]
    int8_activations: bool  # W8A8; else activations in two exact 7-bit parts

    @classmethod
    def pack(cls, qweight: torch.Tensor, scales: torch.Tensor, int8_activations: bool) -> "PanelInt8":
        out_features, in_features = qweight.shape
        rows, columns = _round_up(out_features, PANEL_WIDTH), _round_up(in_features, GROUP)
        padded = torch.zeros(rows, columns, dtype=torch.int8)
        padded[:out_features, :in_features] = qweight
        panels = padded.view(rows // PANEL_WIDTH, PANEL_WIDTH, columns // GROUP, GROUP).transpose(1, 2)
        header = torch.zeros(HEADER_BYTES // 4, dtype=torch.int32)
        header[0] = 1 if int8_activations else 2
        padded_scales = torch.zeros(rows)
        padded_scales[:out_features] = scales.float()
        sums = padded.sum(1, dtype=torch.int32) * ACTIVATION_OFFSET
        parts = [header, padded_scales, sums, panels.contiguous().view(-1)]
        buffer = torch.cat([part.view(-1).view(torch.uint8) for part in parts])
        return cls(buffer, (out_features, in_features), int8_activations)

    @property
    def scales(self) -> torch.Tensor:
        start = HEADER_BYTES
        return self.buffer[start : start + 4 * self.shape[0]].view(torch.float32)

    def unpack(self) -> torch.Tensor:
        """The int8 values [out, in]."""
        out_features, in_features = self.shape
        rows, groups = _round_up(out_features, PANEL_WIDTH), _round_up(in_features, GROUP) // GROUP
        panels = self.buffer[HEADER_BYTES + 8 * rows :].view(torch.int8)
        dense = panels.view(rows // PANEL_WIDTH, groups, PANEL_WIDTH, GROUP).transpose(1, 2).reshape(rows, -1)
        return dense[:out_features, :in_features].contiguous()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] float32 -> [..., out], x quantized per token (csrc/packed_int8.c)."""
        from kvpilot.kernels import cpu_extension

        x2, lead = flatten_tokens(x.float())
        y = cpu_extension.int8_gemm_packed(x2, self.buffer, self.shape[0], bias)
        return y.reshape(*lead, self.shape[0])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
