"""`kvpilot bench int8-gemm`: microseconds per call of one per-channel int8 linear, kvpilot's
panels (VNNI or AVX2) vs oneDNN's int8 GEMM vs fbgemm vs the float32 packed linear, per layer
shape and row count.

Each int8 figure is the whole `Int8Weight.linear` (activation quantization included) in mode
w8a8 (int8 activations per token) and mode int8 (float activations as two int7 halves), so the
table is the basis for which GEMM the engine runs (kernels/quant/int8.py).
"""

import argparse
import time
from collections.abc import Callable

import torch
from kvpilot.kernels.packed_float import pack_float_weight
from kvpilot.kernels.quant import Int8Weight, int8, quantize
from kvpilot.kernels.quant.int8 import use_int8_panels, use_onednn_int8
from kvpilot.kernels.quant.onednn_int8 import OnednnInt8
from kvpilot.kernels.quant.panel_int8 import PanelInt8
from kvpilot.serving.bench.machine import describe_machine, format_machine

# SmolLM2-135M's linears (in_features x out_features): qkv, o, gate+up, down.
DEFAULT_SHAPES = "576x960,576x576,576x3072,1536x576"
DEFAULT_ROWS = "1,4,16,32,128,512"


def microseconds(call: Callable[[], object], repeats: int) -> float:
    """The lower quartile of `repeats` timed calls (robust to a neighbour taking the CPU)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 4] * 1e6


def build_weights(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Label -> linear: each int8 mode on kvpilot's panels and oneDNN (where they run here) and on
    fbgemm, and fp32."""
    q = quantize(weight, "int8")
    qweight, scales = q.qweight, q.scales
    packs = {"fbgemm": lambda _: int8._prepack(qweight, scales[:, 0])}
    if use_onednn_int8():
        packs = {"onednn": lambda _: OnednnInt8.pack(qweight, scales[:, 0]), **packs}
    if use_int8_panels():  # the panels carry how activations are quantized
        packs = {"panels": lambda w8a8: PanelInt8.pack(qweight, scales[:, 0], w8a8), **packs}
    linears = {}
    for gemm, pack in packs.items():
        for mode in ("w8a8", "int8"):
            w8a8 = mode == "w8a8"
            linears[f"{mode} {gemm}"] = Int8Weight(scales, q.group_size, None, pack(w8a8), w8a8).linear
    linears["fp32"] = pack_float_weight(weight).linear
    return linears


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "int8-gemm", help="int8 linear timings: oneDNN vs fbgemm vs fp32, per shape and row count"
    )
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated IN x OUT layer shapes")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated row counts (tokens per call)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.set_defaults(run=main)
    return parser


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise SystemExit(f"kvpilot bench int8-gemm: error: --shapes: expected IN x OUT pairs, got {text!r}")
    return shapes  # type: ignore[return-value]


def main(args: argparse.Namespace) -> int:
    shapes = parse_shapes(args.shapes)
    rows = [int(n) for n in args.rows.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(format_machine(describe_machine()))
    print("us per call (lower quartile); int8 modes include quantizing the activations")
    header = None
    for in_features, out_features in shapes:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=generator) * 0.05
        linears = build_weights(weight)
        if header is None:
            header = f"{'in x out':>11} {'rows':>5} " + " ".join(f"{label:>12}" for label in linears)
            print(header)
        for m in rows:
            x = torch.randn(m, in_features, generator=generator)
            times = [microseconds(lambda f=f, x=x: f(x), args.repeats) for f in linears.values()]
            cells = " ".join(f"{t:>12.0f}" for t in times)
            print(f"{in_features:>5} x {out_features:<5} {m:>5} {cells}", flush=True)
    return 0
