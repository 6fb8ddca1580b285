"""int8 weights: symmetric, one scale per output channel (or per group of input columns).

Per-channel weights on CPU live only in a prepacked form: kvpilot's own panels wherever its
kernel is compiled in, AVX-512 VNNI or AVX2 (kernels/quant/panel_int8.py: W8A8 1.4-4x the
library paths below at 8-512 rows with VNNI, ~2x fbgemm in the AVX2 build on our Zen 4, and the
layout the native decode stack reads; it quantizes activations itself, in the two ways below,
exact with either instruction set); otherwise oneDNN's where its int8 GEMM is exact on this CPU
and compiled for it (kernels/quant/onednn_int8.py: AMX/VNNI, 1.5-3.8x faster than fbgemm from 32
rows up), else fbgemm's (`torch.ops.quantized.linear_dynamic`). Activations reach them in one of
two ways:
- weight-only int8 (mode `int8`): as two exact int7 halves (`_split_activation_linear`): float
  accuracy, twice the GEMM rows;
- W8A8 (mode `w8a8`, `int8_activations=True`): quantized to int8 per token, as in SmoothQuant
  (`_w8a8_linear`). The integer product is exact on every CPU: oneDNN's is probed exact before
  it is used; fbgemm runs one 8-bit GEMM where it accumulates u8 x s8 products in int32 (VNNI),
  two 7-bit passes elsewhere (AVX2's `vpmaddubsw` saturates pairs of 8-bit products at int16).
  One-time probes decide (`use_onednn_int8`, `one_pass_int8_is_exact`).
Grouped weights (GGUF Q8_0: 32 columns per scale) are dequantized a few rows at a time.
"""

import functools
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from kvpilot.kernels import cpu_extension
from kvpilot.kernels.quant.cpu_ops import flatten_tokens, linear_by_row_chunks
from kvpilot.kernels.quant.onednn_int8 import GEMM_ENV, OnednnInt8, onednn_int8_is_exact
from kvpilot.kernels.quant.panel_int8 import PanelInt8

QMAX = 127
logger = logging.getLogger(__name__)
# `_split_activation_linear`: value = hi + lo / LO_SCALE, both parts integers of 7 bits.
HI_LEVELS = 63
LO_SCALE = 2 * HI_LEVELS
# fbgemm slows down super-linearly on tall inputs; rows are independent, so split them. Wide
# outputs (a vocabulary head) want shorter calls than the layers' projections (measured).
FBGEMM_ROWS_PER_CALL = 128
WIDE_OUTPUT = 8192
WIDE_OUTPUT_ROWS_PER_CALL = 64


@dataclass(eq=False)
class Int8Weight:
    scales: torch.Tensor  # float32 [out, num_groups]
    group_size: int  # == in_features for per-output-channel scales
    stored: torch.Tensor | None  # int8 [out, in]; None when the weight lives in `packed`
    packed: Any = None  # per-channel weight prepacked: `PanelInt8`, `OnednnInt8` or fbgemm's (CPU)
    int8_activations: bool = False  # W8A8 (per-token int8) instead of exact activations

    @classmethod
    def from_int8(
        cls,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        group_size: int | None = None,
        int8_activations: bool = False,
    ):
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
            packed = _pack(qweight, scales[:, 0], int8_activations)
            return cls(scales, group_size, None, packed, int8_activations)
        return cls(scales, group_size, qweight, None, int8_activations)

    @property
    def qweight(self) -> torch.Tensor:
        if self.stored is not None:
            return self.stored
        if isinstance(self.packed, OnednnInt8 | PanelInt8):
            return self.packed.unpack()
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
        if isinstance(self.packed, PanelInt8):  # quantizes x itself, as the weight says
            return self.packed.linear(x).to(x.dtype)
        x2, lead = flatten_tokens(x)
        packed_linear = _w8a8_linear if self.int8_activations else _split_activation_linear
        if isinstance(self.packed, OnednnInt8):  # one call: oneDNN keeps its speed on tall inputs
            y = packed_linear(x2.float(), self.packed).to(x.dtype)
        elif self.packed is not None:
            rows_per_call = WIDE_OUTPUT_ROWS_PER_CALL if self.shape[0] > WIDE_OUTPUT else FBGEMM_ROWS_PER_CALL
            parts = [packed_linear(rows, self.packed) for rows in x2.float().split(rows_per_call)]
            y = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(x.dtype)
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
        return self._like(self.qweight.to(device), self.scales.to(device))

    @classmethod
    def concat_rows(cls, parts: list["Int8Weight"]) -> "Int8Weight | None":
        if len({(part.group_size, part.int8_activations) for part in parts}) != 1:
            return None
        qweight = torch.cat([part.qweight for part in parts])
        return parts[0]._like(qweight, torch.cat([part.scales for part in parts]))

    def select_rows(self, index: torch.Tensor) -> "Int8Weight":
        return self._like(self.qweight[index], self.scales[index])

    def _like(self, qweight: torch.Tensor, scales: torch.Tensor) -> "Int8Weight":
        return Int8Weight.from_int8(qweight, scales, self.group_size, self.int8_activations)


def quantize_int8(
    weight: torch.Tensor, group_size: int | None = None, int8_activations: bool = False
) -> Int8Weight:
    """Round-to-nearest symmetric int8; one scale per output channel unless group_size is given."""
    out, in_features = weight.shape
    group_size = group_size or in_features
    if in_features % group_size:
        raise ValueError(f"group_size: {group_size} does not divide in_features {in_features}")
    groups = weight.detach().float().view(out, -1, group_size)
    scales = groups.abs().amax(-1) / QMAX
    inverse = torch.where(scales == 0, 0.0, 1.0 / scales)
    q = (groups * inverse[..., None]).round().clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8Weight.from_int8(q.view(out, in_features), scales, group_size, int8_activations)


def _dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    rows = q.shape[0]
    return (q.view(rows, -1, group_size).float() * scales[..., None]).view(rows, -1)


def _pack(qweight: torch.Tensor, scales: torch.Tensor, int8_activations: bool) -> Any:
    """kvpilot's int8 panels where its kernel runs here (`use_int8_panels`); else oneDNN's packed
    weight where its int8 GEMM is used here (`use_onednn_int8`), else fbgemm's."""
    if use_int8_panels():
        return PanelInt8.pack(qweight, scales, int8_activations)
    return OnednnInt8.pack(qweight, scales) if use_onednn_int8() else _prepack(qweight, scales)


@functools.cache
def use_int8_panels() -> bool:
    """Whether per-channel int8 weights go to kvpilot's panel kernel: compiled in for this CPU
    (AVX-512 VNNI or AVX2), and KVPILOT_INT8_GEMM does not name a library GEMM (`onednn` or
    `fbgemm`)."""
    forced = os.environ.get(GEMM_ENV, "").lower()
    chosen = forced not in ("onednn", "fbgemm") and cpu_extension.supports_int8_panels()
    if chosen:  # otherwise `use_onednn_int8` says which library GEMM
        instruction = cpu_extension.int8_panel_instruction()
        logger.info("int8 linears on this CPU: kvpilot's panels (%s, exact: int32 sums)", instruction)
    return chosen


# oneDNN without a compiled kernel for its packed int8 layout falls back to its reference
# matmul (`ref_int8`): exact, but ~1000x slower (AMD Zen 4 with AVX-512 VNNI: 3.4 s for 96 x 576
# x 3072). Compiled, it takes 0.3-1.2x fbgemm's time; this bound only tells the two apart.
ONEDNN_SLOWDOWN_LIMIT = 20.0


@functools.cache
def use_onednn_int8() -> bool:
    """Whether per-channel int8 weights go to oneDNN here: its product is exact
    (`onednn_int8_is_exact`) and it runs a compiled kernel, timed once against fbgemm on one
    layer (32 x 256 x 256, `_best_time_s`). A reference kernel takes ~40 ms there, fbgemm ~0.05."""
    if not onednn_int8_is_exact():
        logger.info("int8 linears on this CPU: fbgemm")
        return False
    generator = torch.Generator().manual_seed(0)
    qweight = torch.randint(-QMAX, QMAX + 1, (256, 256), dtype=torch.int8, generator=generator)
    rows = torch.randint(-QMAX, QMAX + 1, (32, 256), dtype=torch.int8, generator=generator)
    onednn, fbgemm = OnednnInt8.pack(qweight, torch.ones(256)), _prepack(qweight, torch.ones(256))
    slowdown = _best_time_s(lambda: onednn.linear(rows)) / _best_time_s(
        lambda: fbgemm_linear(rows.float(), fbgemm, reduce_range=False)
    )
    if slowdown > ONEDNN_SLOWDOWN_LIMIT:
        logger.info(
            "int8 linears on this CPU: fbgemm (oneDNN's int8 GEMM is exact but %.0fx slower: its "
            "reference kernel, none compiled for this CPU)", slowdown,
        )  # fmt: skip
        return False
    logger.info("int8 linears on this CPU: oneDNN (exact: int32 accumulation; %.1fx fbgemm's time)", slowdown)
    return True


def _best_time_s(call, repeats: int = 3) -> float:
    """The best of `repeats` timed calls after a warm-up (oneDNN builds its kernel on the first),
    on one thread: a busy core cannot stall an OpenMP barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)
    finally:
        torch.set_num_threads(threads)


def _prepack(qweight: torch.Tensor, scales: torch.Tensor) -> Any:
    zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized-tensor constructors warn about future deprecation
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(q, None)


def _w8a8_linear(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """W8A8: int8 weights times int8 activations with one scale per token (as in SmoothQuant).

    Each row is scaled to integers in [-127, 127] (its own scale, max|x| / 127). oneDNN takes them
    as int8 and returns the exact integer product times the weight scales. fbgemm's dynamic
    linear quantizes the whole input with one scale, which would make a token's output depend on
    its batch neighbours, so an anchor row pins fbgemm's range: every
    row's integers pass through unchanged and the result is independent of what else is in
    the batch. Where fbgemm's 8-bit product is exact (`one_pass_int8_is_exact`) that is one
    GEMM; elsewhere the integers go in two exact 7-bit halves (`split_int8_rows`).
    """
    tokens = x.shape[0]
    if isinstance(packed, OnednnInt8):
        if cpu_extension.load() is not None:
            q, unit = cpu_extension.quantize_rows_s8(x)
        else:
            q, unit = quantize_rows_int8(x)
            q = q[:tokens].to(torch.int8)
        return packed.linear(q).mul_(unit)
    if cpu_extension.load() is not None:
        q, unit = cpu_extension.quantize_rows_int8(x)
    else:
        q, unit = quantize_rows_int8(x)
    if one_pass_int8_is_exact():
        return fbgemm_linear(q, packed, reduce_range=False)[:tokens].mul_(unit)
    y = fbgemm_linear(split_int8_rows(q[:tokens]), packed, reduce_range=True)
    return y[:tokens].mul_(2).add_(y[tokens : 2 * tokens]).mul_(unit)


def fbgemm_linear(rows: torch.Tensor, packed: Any, reduce_range: bool) -> torch.Tensor:
    """fbgemm's dynamic int8 linear: rows quantized with one range (8 bits, or 7 if reduced)."""
    return torch.ops.quantized.linear_dynamic(rows, packed, reduce_range)


def split_int8_rows(q: torch.Tensor) -> torch.Tensor:
    """Integer rows q [T, K] in [-127, 127] -> [2T + 1, K]: h = floor(q / 2) in [-64, 63], then
    r = q - 2h in {0, 1}, then the 7-bit anchor row. fbgemm's reduced range maps them to
    h + 64 in [0, 127] and r + 64 in {64, 65}, so a pair of products stays within
    2 * 127 * 127 = 32,258 < 2^15 and q @ W = 2 (h @ W) + r @ W exactly on every CPU."""
    high = torch.div(q, 2, rounding_mode="floor")
    return torch.cat([high, q - 2 * high, _anchor_row(q.shape[1], HI_LEVELS)])


@functools.cache
def one_pass_int8_is_exact() -> bool:
    """Whether fbgemm multiplies full 8-bit activations exactly on this CPU, probed once.

    With VNNI (`vpdpbusd`) u8 x s8 products accumulate straight into int32; AVX2's
    `vpmaddubsw` adds pairs of them in saturating int16 first (255 x 127 x 2 > 32,767).
    The CPU's name for its capability cannot tell (torch says AVX512 on CPUs without VNNI),
    so the worst case is multiplied through the one-pass path and compared with the exact
    integer product: activations at +-127 against weights at +-127.
    """
    signs = torch.tensor([1.0, -1.0])
    weight = (signs.repeat(8)[:, None] * torch.full((16, 64), QMAX)).to(torch.int8)
    packed = _prepack(weight, torch.ones(16))
    activations = torch.cat([signs[:, None] * QMAX * torch.ones(2, 64), _anchor_row(64, QMAX)])
    fast = fbgemm_linear(activations, packed, reduce_range=False)[:2]
    exact = activations[:2].double() @ weight.double().t()
    is_exact = torch.equal(fast.double(), exact)
    path = "one 8-bit GEMM (exact: int32 accumulation)" if is_exact else "two exact 7-bit GEMMs"
    logger.info("w8a8 linears on this CPU: %s", path)
    return is_exact


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (round(x / unit) with fbgemm's anchor row appended [T + 1, K], unit [T, 1]);
    unit = max|x| / 127 per row. The torch version of the native kernel."""
    unit = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True)
    unit = unit.clamp_min_(torch.finfo(torch.float32).tiny).div_(QMAX)
    return torch.cat([torch.div(x, unit).round_(), _anchor_row(x.shape[1], QMAX)]), unit


def _split_activation_linear(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """Weight-int8 linear with (almost) float activations, independent of the other rows in x.

    Each row is scaled to [-63, 63] and split into two integer parts,
    x = max|x| / 63 * (hi + lo / 126), which oneDNN takes as int8; for fbgemm an anchor row pins
    its 7-bit range to [-64, 63] (scale 1, zero point 64). Both parts pass through losslessly,
    and the result matches the float-activation product to ~1e-4 relative, whatever else is in
    the batch.
    """
    tokens = x.shape[0]
    native = cpu_extension.load() is not None
    if isinstance(packed, OnednnInt8):
        if native:
            parts, unit = cpu_extension.split_rows_s7(x)
        else:
            parts, unit = split_rows_int7(x)
            parts = parts[: 2 * tokens].to(torch.int8)
        y = packed.linear(parts)
    else:
        parts, unit = cpu_extension.split_rows_int7(x) if native else split_rows_int7(x)
        y = fbgemm_linear(parts, packed, reduce_range=True)
    return y[:tokens].add_(y[tokens : 2 * tokens], alpha=1 / LO_SCALE).mul_(unit)


def split_rows_int7(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (hi parts, lo parts and fbgemm's anchor row [2T + 1, K], unit [T, 1]);
    unit = max|x| / 63 per row. The torch version of the native kernel."""
    unit = x.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny).div_(HI_LEVELS)
    scaled = x / unit
    hi = scaled.round()
    lo = scaled.sub_(hi).mul_(LO_SCALE).round_()
    return torch.cat([hi, lo, _anchor_row(x.shape[1], HI_LEVELS)]), unit


@functools.cache
def _anchor_row(in_features: int, top: int) -> torch.Tensor:
    """A row spanning [-(top + 1), top]: fixes fbgemm's dynamic range to scale 1."""
    anchor = torch.zeros(1, in_features)
    anchor[0, 0], anchor[0, -1] = -(top + 1), top
    return anchor
