"""The `kvpilot` command: `serve` and `demo` here; other subcommands live in their own modules."""

import argparse
import importlib
import logging
import sys

from kvpilot.serving.contract import ENV_PREFIX, KV_CACHE_DTYPES, QUANTIZATION_MODES, SERVE_FLAGS
from kvpilot.serving.validation import problems
from pydantic import ValidationError

# Subcommands owned by other modules: (module, function). Imported lazily so that `kvpilot serve`
# never pays for the operator's imports, and tolerated while a module is missing.
PLUGIN_PARSERS = (
    ("kvpilot.serving.bench.cli", "add_parser"),
    ("kvpilot.operator.cli", "add_parsers"),
)


def _flag(field: str) -> str:
    return SERVE_FLAGS.get(field, "--" + field.replace("_", "-"))


def add_serve_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description=f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG_NAME>.",
        argument_default=argparse.SUPPRESS,  # absent flags fall back to KVPILOT_* env vars, then defaults
    )
    parser.add_argument(_flag("model"), help="checkpoint directory or .gguf file (default: SmolLM2-135M)")
    parser.add_argument(_flag("served_model_name"), help="the model name clients send (default: --model)")
    parser.add_argument(_flag("host"), help="bind address (default 127.0.0.1)")
    parser.add_argument(_flag("port"), help="bind port (default 8000)")
    engine_numbers = {
        "max_num_seqs": "sequences in one batch (default 64)",
        "max_num_batched_tokens": "token budget of one engine step (default 512)",
        "max_model_len": "context length (default: the model's)",
        "block_size": "tokens per KV block (default 16)",
        "num_kv_blocks": "KV blocks (default: sized from --kv-cache-memory)",
    }
    for field, help_text in engine_numbers.items():
        parser.add_argument(_flag(field), metavar="N", help=help_text)
    parser.add_argument(
        _flag("enable_prefix_caching"),
        action=argparse.BooleanOptionalAction,
        help="automatic prefix caching (default on)",
    )
    parser.add_argument(_flag("max_queue_len"), metavar="N", help="waiting requests before 429 (default 256)")
    parser.add_argument(
        _flag("shutdown_timeout"), metavar="SECONDS", help="drain time on SIGTERM (default 30)"
    )
    parser.add_argument(_flag("api_key"), help="require `Authorization: Bearer KEY` on /v1/*")
    parser.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, help="log every HTTP request (default on)"
    )
    parser.add_argument("--kv-cache-memory", metavar="SIZE", help="KV cache budget, e.g. 2GiB (default 1GiB)")
    parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    parser.add_argument(_flag("quantization"), help=f"weight format: {', '.join(QUANTIZATION_MODES)}")
    parser.add_argument(_flag("kv_cache_dtype"), help=f"KV cache format: {', '.join(KV_CACHE_DTYPES)}")
    parser.add_argument(_flag("tensor_parallel_size"), metavar="N", help="only 1 is supported")
    parser.add_argument("--seed", metavar="N", help="engine seed for unseeded sampling (default 0)")
    parser.set_defaults(handler=_run_serve)


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="start the server on the default model, ask it one chat question, print the answer"
    )
    parser.add_argument("--model", default=None, help="checkpoint directory or .gguf file (default: SmolLM2)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.set_defaults(handler=_run_demo)


def build_parser(with_plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpilot", description="LLM serving engine and Kubernetes operator")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(subparsers)
    add_demo_parser(subparsers)
    for module_name, function in PLUGIN_PARSERS if with_plugins else ():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise  # the module exists but one of its own imports is missing: a real error
            continue
        getattr(module, function)(subparsers)
    return parser


def settings_error_line(error: ValidationError, given: set[str]) -> str:
    """The first validation error as one line naming the flag (or env var) that carried the value."""
    problem = problems(error)[0]
    if not problem.path:
        return problem.message
    field = problem.path[-1]  # a setting, or the EngineConfig field its model validator named
    field = "kv_cache_memory" if field == "kv_cache_memory_bytes" else field
    source = _flag(field) if field in given else f"{_flag(field)} ({ENV_PREFIX}{field.upper()})"
    value = problem.value
    shown = value is not None and not isinstance(value, dict) and "got" not in problem.message
    return f"{source}: {problem.message}{f' (got {value!r})' if shown else ''}"


def _run_serve(args: argparse.Namespace) -> int:
    from kvpilot.serving.api.settings import ServeSettings

    given = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "func")}
    try:
        settings = ServeSettings(**given)
        settings.model_path  # noqa: B018 - resolves the default model, fails early when it is missing
    except ValidationError as exc:
        print(f"kvpilot serve: error: {settings_error_line(exc, set(given))}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"kvpilot serve: error: --model: {exc}", file=sys.stderr)
        return 2
    from kvpilot.serving.api.server import run_server

    return run_server(settings)


def _run_demo(args: argparse.Namespace) -> int:
    from kvpilot.serving.api.demo import run_demo

    return run_demo(args.model, args.prompt, args.max_tokens)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    # `serve` and `demo` never import the other subcommands' modules: a pod runs only `serve`.
    own_command = bool(argv) and argv[0] in ("serve", "demo")
    args = build_parser(with_plugins=not own_command).parse_args(argv)
    run = getattr(args, "handler", None) or args.func  # subcommands from other modules may set `func`
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
