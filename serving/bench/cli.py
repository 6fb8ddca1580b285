"""`kvpilot bench ...`: one subcommand per benchmark module."""

from kvpilot.serving.bench import int8_gemm, quant, router, serve, spec, throughput


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: offline throughput, online serving, quantization modes, int8 GEMMs, "
        "router balancing, speculative decoding",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module in (throughput, serve, quant, int8_gemm, router, spec):
        module.add_parser(benchmarks)
