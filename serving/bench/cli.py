"""`kvpilot bench ...`: one subcommand per benchmark module."""

from kvpilot.serving.bench import quant, router, serve, spec, throughput


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: offline throughput, online serving, quantization modes, router balancing, "
        "speculative decoding",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module in (throughput, serve, quant, router, spec):
        module.add_parser(benchmarks)
