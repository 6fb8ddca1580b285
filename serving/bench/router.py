"""`kvpilot bench router`: what prefix-aware balancing buys, measured on real processes (with
`--ttfb`: what the router adds to the time to first byte, see router_ttfb.py).

Starts `--num-servers` `kvpilot serve` processes (each with a KV cache too small to hold every
shared prefix at once) and `kvpilot router` in front of them, once per balancing policy (fresh
servers each time, so every policy starts cold), and sends the same workload: many requests
sharing a few long "system prompts". Prints, per policy, the prefix-cache hit rate summed over
the servers (`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`) and the client's
mean time to first token through the router.
"""

import argparse
import asyncio
import contextlib
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from kvpilot.serving import contract
from kvpilot.serving.bench.metrics import compute_metrics
from kvpilot.serving.bench.serve import ServeBenchConfig, positive_int, run_benchmark
from kvpilot.serving.bench.workload import (
    build_shared_prefix_workload,
    load_tokenizer,
    read_text,
    tokenize_text,
)
from kvpilot.serving.demo import free_port, wait_until_ready
from prometheus_client.parser import text_string_to_metric_families

MODEL_NAME = "bench"


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    hits: float
    queries: float
    mean_ttft_ms: float
    request_throughput: float
    errors: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def prefix_cache_counts(base_url: str) -> tuple[float, float]:
    """(prefix cache hits, queries) from one server's /metrics."""
    text = httpx.get(base_url + contract.METRICS_PATH, timeout=10).text
    counts = {
        f"{contract.METRIC_PREFIX_CACHE_HITS}_total": 0.0,
        f"{contract.METRIC_PREFIX_CACHE_QUERIES}_total": 0.0,
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in counts:
                counts[sample.name] += sample.value
    return counts[f"{contract.METRIC_PREFIX_CACHE_HITS}_total"], counts[
        f"{contract.METRIC_PREFIX_CACHE_QUERIES}_total"
    ]


@contextlib.contextmanager
def started(command: list[str], base_url: str, log: Path, timeout: float = 600) -> Iterator[subprocess.Popen]:
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(base_url, process, timeout)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


CLI = [sys.executable, "-m", "kvpilot.serving.cli"]


def start_server(
    stack: contextlib.ExitStack, model: str | None, log: Path, *extra: str
) -> tuple[str, subprocess.Popen]:
    """A `kvpilot serve` on a free port, ready: its base URL and process. Stopped when `stack` closes."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [*CLI, "serve", "--port", url.rsplit(":", 1)[1], "--served-model-name", MODEL_NAME]
    command += ["--no-access-log", *extra] + (["--model", model] if model else [])
    return url, stack.enter_context(started(command, url, log))


def start_router(
    stack: contextlib.ExitStack, config: dict, config_path: Path, log: Path
) -> tuple[str, subprocess.Popen]:
    """`kvpilot router` with this config on a free port, ready: its base URL and process."""
    config_path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    command = [*CLI, "router", "--config", str(config_path), "--host", "127.0.0.1"]
    command += ["--port", url.rsplit(":", 1)[1], "--no-access-log"]
    return url, stack.enter_context(started(command, url, log))


def run_policy(args: argparse.Namespace, policy: str, requests, workdir: Path) -> PolicyResult:
    with contextlib.ExitStack() as stack:
        blocks = ("--num-kv-blocks", str(args.num_kv_blocks))
        logs = [workdir / f"{policy}-server{i}.log" for i in range(args.num_servers)]
        urls = [start_server(stack, args.model, log, *blocks)[0] for log in logs]
        config = {
            "models": [
                {"name": MODEL_NAME, "balancing": policy, "revisions": [{"name": "r", "endpoints": urls}]}
            ]
        }
        router_url, _ = start_router(
            stack, config, workdir / f"{policy}.yaml", workdir / f"{policy}-router.log"
        )
        bench = ServeBenchConfig(base_url=router_url, model=MODEL_NAME, max_concurrency=args.max_concurrency)
        run = asyncio.run(run_benchmark(bench, requests, show_progress=False))
        counts = [prefix_cache_counts(url) for url in urls]
    metrics = compute_metrics(run.records, run.duration_s)
    return PolicyResult(
        policy,
        hits=sum(hits for hits, _ in counts),
        queries=sum(queries for _, queries in counts),
        mean_ttft_ms=metrics.ttft_s.mean * 1000,
        request_throughput=metrics.request_throughput,
        errors=metrics.errors,
    )


def format_results(results: list[PolicyResult]) -> str:
    lines = [
        "| balancing | prefix-cache hit rate | mean TTFT (ms) | requests/s |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.hit_rate:.1%} ({r.hits:.0f} / {r.queries:.0f} tokens) "
            f"| {r.mean_ttft_ms:.0f} | {r.request_throughput:.2f} |"
        )
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "router", help="prefix vs random balancing through `kvpilot router` in front of real servers"
    )
    parser.add_argument("--model", default=None, help="checkpoint dir or .gguf (default: the default model)")
    parser.add_argument("--num-servers", type=positive_int, default=2)
    parser.add_argument("--num-prompts", type=positive_int, default=128)
    parser.add_argument("--num-prefixes", type=positive_int, default=16, help="shared system prompts")
    parser.add_argument("--prefix-len", type=positive_int, default=256, help="tokens of each shared prompt")
    parser.add_argument("--suffix-len", type=positive_int, default=16, help="each request's own tokens")
    parser.add_argument("--output-len", type=positive_int, default=8)
    parser.add_argument(
        "--num-kv-blocks", type=positive_int, default=192,
        help="KV blocks of 16 tokens per server; the default holds about 3/4 of the shared prompts",
    )  # fmt: skip
    parser.add_argument("--max-concurrency", type=positive_int, default=4)
    parser.add_argument("--policies", default="prefix,random", help="comma-separated balancing policies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON to this file")
    parser.add_argument(
        "--ttfb", action="store_true",
        help="instead: time to first byte straight to one server vs through the router (uses --model, "
        "--output-len, --json)",
    )  # fmt: skip
    parser.add_argument(
        "--ttfb-requests", type=positive_int, default=40, help="with --ttfb: streamed requests each way"
    )
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    import logging

    from kvpilot.serving.bench.machine import describe_machine, format_machine

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if args.ttfb:
        from kvpilot.serving.bench.router_ttfb import main as ttfb_main

        return ttfb_main(args)
    tokenizer = load_tokenizer(args.model)
    text_token_ids = tokenize_text(tokenizer, read_text())
    shape = (args.num_prompts, args.num_prefixes, args.prefix_len, args.suffix_len, args.output_len)
    requests = build_shared_prefix_workload(text_token_ids, *shape, seed=args.seed)
    machine = describe_machine()
    print(format_machine(machine))
    print(
        f"{args.num_prompts} requests, {args.num_prefixes} shared prefixes of {args.prefix_len} tokens + "
        f"{args.suffix_len} own tokens, {args.output_len} output tokens, {args.max_concurrency} in flight; "
        f"{args.num_servers} servers x {args.num_kv_blocks} KV blocks"
    )
    with tempfile.TemporaryDirectory(prefix="kvpilot-bench-router-") as tmp:
        results = [
            run_policy(args, policy.strip(), requests, Path(tmp)) for policy in args.policies.split(",")
        ]
    print(format_results(results))
    if args.json:
        document = {
            "machine": machine,
            "args": {k: v for k, v in vars(args).items() if k not in ("run", "json")},
        }
        document["results"] = [r.__dict__ | {"hit_rate": r.hit_rate} for r in results]
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0 if all(r.errors == 0 and not math.isnan(r.mean_ttft_ms) for r in results) else 1
