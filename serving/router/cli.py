"""`kvpilot router --config router.yaml`: the tenant-facing proxy in front of `kvpilot serve` replicas."""

import argparse
import sys
from pathlib import Path

from kvpilot.serving.router.activation import DEFAULT_MAX_BYTES

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 4 << 20


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "router",
        help="run the OpenAI-aware router (tenants, revision weights, prefix affinity, scale from zero)",
        description="Reloads --config when the file (or a key file it names) changes; a bad reload keeps "
        "the last good config.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the router config (YAML)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"bind port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
        help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )  # fmt: skip
    parser.add_argument(
        "--max-held-bytes", type=int, default=DEFAULT_MAX_BYTES, metavar="N",
        help="request bodies held for scale from zero, over all models; beyond, 429 "
        f"(default {DEFAULT_MAX_BYTES}: a quarter of the chart's 512Mi router memory limit)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-interval", type=float, default=2.0, metavar="SECONDS",
        help="seconds between /ready and /metrics polls of each endpoint (default 2)",
    )  # fmt: skip
    parser.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="do not log every request"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvpilot.serving.router.app import create_app
    from kvpilot.serving.router.config import ConfigError
    from kvpilot.serving.router.server import run_router
    from kvpilot.serving.router.state import RouterSettings

    checked = {
        "--max-body-bytes": args.max_body_bytes,
        "--max-held-bytes": args.max_held_bytes,
        "--probe-interval": args.probe_interval,
    }
    for name, value in checked.items():
        if value <= 0:
            print(f"kvpilot router: error: {name}: must be positive (got {value})", file=sys.stderr)
            return 2
    settings = RouterSettings(
        Path(args.config),
        args.host,
        args.port,
        args.max_body_bytes,
        probe_interval=args.probe_interval,
        max_held_bytes=args.max_held_bytes,
    )
    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"kvpilot router: error: {exc}", file=sys.stderr)
        return 2
    run_router(app, args.host, args.port, access_log=args.access_log)
    return 0
