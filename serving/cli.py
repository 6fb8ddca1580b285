"""The `kvpilot` command: a table of subcommands, each registered by the module that owns it.

A module named here exposes `register(subparsers)`, which adds its parsers and sets
`run(args) -> exit code` on each. Only the named command's module is imported (a pod running
`kvpilot serve` never imports the operator or the benchmarks); `kvpilot --help` imports them all,
which is cheap: the modules keep their heavy imports inside `run`.
"""

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "serve": "kvpilot.serving.api.cli",
    "router": "kvpilot.serving.router.cli",
    "demo": "kvpilot.serving.demo",
    "bench": "kvpilot.serving.bench.cli",
    "crd": "kvpilot.operator.cli",
    "render": "kvpilot.operator.cli",
    "operator": "kvpilot.operator.cli",
}


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the given commands (default: all) registered."""
    parser = argparse.ArgumentParser(prog="kvpilot", description="LLM serving engine and Kubernetes operator")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = dict.fromkeys(COMMANDS[name] for name in (commands or COMMANDS))
    for module in modules:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    named = [argv[0]] if argv and argv[0] in COMMANDS else None
    args = build_parser(named).parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
