"""`kvpilot bench ...`: one subcommand per benchmark module."""

from kvpilot.serving.bench import quant, router, serve, throughput


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmarks: offline throughput, online serving, quantization modes, router balancing"
    )
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module in (throughput, serve, quant, router):
        module.add_parser(benchmarks)
