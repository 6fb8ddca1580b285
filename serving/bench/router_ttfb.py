"""`kvpilot bench router --ttfb`: what the router adds to the time to first byte of a stream.

Starts one `kvpilot serve` and `kvpilot router` in front of it, then sends the same streamed
completion, one at a time, alternately straight to the server and through the router (each round
switches which goes first, so a drift in the machine's load hits both alike). The time to first
byte is from sending the request to the first byte of the response body (the first token's
event). Prints median and p95 each way, their difference and ratio, where it ran and how loaded
the machine was, and the router process's own CPU time per routed request (from /proc, its
probing of the server included): on a shared machine the latency figures move with the load, the
CPU time much less.
"""

import argparse
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

WARMUP_ROUNDS = 4  # not counted: first requests load kernels and fill the prefix cache
PROMPT = "Explain in one sentence why the sky is blue, then name three colours of a sunset."


@dataclass(frozen=True)
class TTFBStats:
    """Times to first byte of one path, in milliseconds."""

    path: str
    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 50))

    @property
    def p95_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 95))  # linear interpolation, as numpy


def format_ttfb(direct: TTFBStats, routed: TTFBStats) -> str:
    """The comparison table: median and p95 each way, then the router's difference and ratio."""

    def delta(routed_ms: float, direct_ms: float) -> str:
        return f"{routed_ms - direct_ms:+.1f} (x{routed_ms / direct_ms:.3f})"

    lines = [
        "| path | requests | median TTFB (ms) | p95 TTFB (ms) |",
        "|---|---|---|---|",
        *(
            f"| {s.path} | {len(s.samples_ms)} | {s.median_ms:.1f} | {s.p95_ms:.1f} |"
            for s in (direct, routed)
        ),
        f"| router - direct | | {delta(routed.median_ms, direct.median_ms)} "
        f"| {delta(routed.p95_ms, direct.p95_ms)} |",
    ]
    return "\n".join(lines)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process from /proc/PID/stat; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def time_to_first_byte(client: httpx.Client, base_url: str, body: dict) -> float:
    """Seconds from sending one streamed completion to its first body byte; the rest is read too."""
    started = time.perf_counter()
    first = None
    with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            if chunk and first is None:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{base_url}: an empty response")
    return first - started


@dataclass(frozen=True)
class Measured:
    direct: TTFBStats
    routed: TTFBStats
    router_cpu_ms_per_request: float | None


def measure(direct_url: str, router_url: str, router_pid: int, body: dict, rounds: int) -> Measured:
    samples: dict[str, list[float]] = {"direct": [], "router": []}
    urls = {"direct": direct_url, "router": router_url}
    cpu_before = None
    with httpx.Client(timeout=120) as client:  # keep-alive on both paths: no connect in the figure
        for i in range(WARMUP_ROUNDS + rounds):
            if i == WARMUP_ROUNDS:
                cpu_before = process_cpu_seconds(router_pid)
            for path in ("direct", "router") if i % 2 == 0 else ("router", "direct"):
                seconds = time_to_first_byte(client, urls[path], body)
                if i >= WARMUP_ROUNDS:
                    samples[path].append(seconds * 1000)
    cpu_after = process_cpu_seconds(router_pid)
    cpu_ms = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) * 1000 / rounds
    return Measured(
        TTFBStats("direct", tuple(samples["direct"])), TTFBStats("router", tuple(samples["router"])), cpu_ms
    )


def _load(averages: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in averages)


def main(args: argparse.Namespace) -> int:
    from kvpilot.serving.bench.machine import describe_machine, format_machine
    from kvpilot.serving.bench.router import MODEL_NAME, start_router, start_server

    machine = describe_machine()
    print(format_machine(machine))
    load_before = os.getloadavg()
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": args.output_len, "stream": True}
    print(
        f"{args.ttfb_requests} streamed completions each way, alternating, one at a time "
        f"({WARMUP_ROUNDS} rounds of warm-up not counted), {args.output_len} output tokens; "
        f"model: {args.model or 'the default model'}"
    )
    with tempfile.TemporaryDirectory(prefix="kvpilot-bench-ttfb-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        server_url, _ = start_server(stack, args.model, workdir / "server.log")
        config = {"models": [{"name": MODEL_NAME, "revisions": [{"name": "r", "endpoints": [server_url]}]}]}
        router_url, router = start_router(stack, config, workdir / "router.yaml", workdir / "router.log")
        measured = measure(server_url, router_url, router.pid, body, args.ttfb_requests)
    load_after = os.getloadavg()
    direct, routed = measured.direct, measured.routed
    print(f"load average (1, 5, 15 min): {_load(load_before)} before, {_load(load_after)} after")
    print(format_ttfb(direct, routed))
    if measured.router_cpu_ms_per_request is not None:
        print(
            f"router CPU time: {measured.router_cpu_ms_per_request:.2f} ms per routed request "
            "(its probing included)"
        )
    if args.json:
        document = {
            "machine": machine,
            "load_average": {"before": load_before, "after": load_after},
            "router_cpu_ms_per_request": measured.router_cpu_ms_per_request,
            "args": {"model": args.model, "requests": args.ttfb_requests, "output_len": args.output_len},
            "results": [
                {"path": s.path, "median_ms": s.median_ms, "p95_ms": s.p95_ms, "samples_ms": s.samples_ms}
                for s in (direct, routed)
            ],
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0
