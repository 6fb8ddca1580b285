"""oneDNN's int8 GEMM for per-channel int8 weights: signed 8-bit activations times a weight
prepacked once (`torch.ops.onednn.qlinear_prepack`), int32 accumulation (AMX or VNNI), and the
per-channel weight scale applied in the same call (`qlinear_pointwise`, float32 out).

On a Xeon with AMX it runs 1.5-3.8x faster than fbgemm from 32 rows up, about even at 1-4 rows
(`kvpilot bench int8-gemm`).
Whether its integer product is exact on this CPU is probed once (`onednn_int8_is_exact`): a
kernel that adds pairs of 8-bit products in saturating int16 (`vpmaddubsw`) would not be, and
then the weights stay with fbgemm (kernels/quant/int8.py), as they do where oneDNN has no
compiled kernel for its packed layout and runs its reference one (`use_onednn_int8`: on an AMD
Zen 4 with AVX-512 VNNI, ~1000x slower). `KVPILOT_INT8_GEMM=fbgemm` keeps them there on any CPU;
`KVPILOT_INT8_GEMM=onednn` keeps int8 weights off kvpilot's own panels (kernels/quant/panel_int8.py).
"""

import functools
import logging
import os
from dataclasses import dataclass

import torch

QMAX = 127
GEMM_ENV = "KVPILOT_INT8_GEMM"
logger = logging.getLogger(__name__)


@dataclass(eq=False)
class OnednnInt8:
    """A per-channel int8 weight [out, in] in oneDNN's packed layout (its only copy)."""

    packed: torch.Tensor  # opaque mkldnn int8 tensor, [in, out]
    scales: torch.Tensor  # float32 [out]
    zero_points: torch.Tensor  # int64 zeros [out] (symmetric)

    @classmethod
    def pack(cls, qweight: torch.Tensor, scales: torch.Tensor) -> "OnednnInt8":
        packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        return cls(packed, scales.float().contiguous(), torch.zeros(qweight.shape[0], dtype=torch.long))

    def unpack(self) -> torch.Tensor:
        """The int8 values [out, in]."""
        return self.packed.to_dense().t().contiguous()

    def linear(self, rows: torch.Tensor) -> torch.Tensor:
        """int8 rows [M, in] -> float32 (rows @ W^T) * scales: the exact integer product, scaled."""
        qlinear = torch.ops.onednn.qlinear_pointwise.default
        x_scale, x_zero_point, out_scale, out_zero_point = 1.0, 0, 1.0, 0
        return qlinear(
            rows, x_scale, x_zero_point, self.packed, self.scales, self.zero_points, None,
            out_scale, out_zero_point, torch.float32, "none", [], "",
        )  # fmt: skip


@functools.cache
def onednn_int8_is_exact() -> bool:
    """Whether oneDNN's int8 GEMM is available and multiplies 8-bit values exactly here, probed once.

    The worst case for int16 pair saturation (+-127 activations against +-127 weights, every
    sign combination, K = 256 so the exact sums still fit float32's 24 bits) plus random rows,
    compared with the float64 product."""
    if os.environ.get(GEMM_ENV, "").lower() == "fbgemm":
        logger.info("oneDNN's int8 GEMM: not used (%s=fbgemm)", GEMM_ENV)
        return False
    generator = torch.Generator().manual_seed(0)
    in_features, signs = 256, torch.tensor([1, -1], dtype=torch.int8)
    alternating = signs.repeat(in_features // 2) * QMAX
    weight = torch.stack([alternating.abs(), -alternating.abs(), alternating, -alternating])
    weight = torch.cat([weight, torch.randint(-QMAX, QMAX + 1, (4, in_features), generator=generator)])
    random_rows = torch.randint(-QMAX, QMAX + 1, (5, in_features), generator=generator)
    rows = torch.cat([weight, random_rows]).to(torch.int8)
    try:
        fast = OnednnInt8.pack(weight.to(torch.int8), torch.ones(weight.shape[0])).linear(rows)
    except RuntimeError as error:  # no oneDNN in this torch build, or no int8 kernel for this CPU
        logger.info("oneDNN's int8 GEMM: unavailable (%s)", error)
        return False
    is_exact = torch.equal(fast.double(), rows.double() @ weight.double().t())
    logger.info("oneDNN's int8 GEMM: %s", "exact" if is_exact else "not exact (int16 pair sums)")
    return is_exact
