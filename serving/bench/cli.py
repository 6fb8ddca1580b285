"""`kvpilot bench ...`: wired into the `kvpilot` command by `kvpilot.serving.cli`."""

import argparse

from kvpilot.serving.bench import quant, serve, throughput


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="benchmarks: offline throughput, online serving, quantization modes"
    )
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    throughput.add_parser(benchmarks)
    serve.add_parser(benchmarks)
    quant.add_parser(benchmarks)
    parser.set_defaults(handler=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    return args.func(args)
