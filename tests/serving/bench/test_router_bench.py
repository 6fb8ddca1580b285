"""`kvpilot bench router`'s pure parts: the shared-prefix workload, the tables, the TTFB statistics."""

import os
import time

from kvpilot.serving.bench.router import PolicyResult, format_results
from kvpilot.serving.bench.router_ttfb import TTFBStats, format_ttfb, process_cpu_seconds
from kvpilot.serving.bench.workload import build_shared_prefix_workload


def test_every_request_is_one_of_the_shared_prefixes_plus_its_own_tokens():
    text = list(range(10_000))
    requests = build_shared_prefix_workload(
        text, num_prompts=40, num_prefixes=3, prefix_len=50, suffix_len=5, output_len=7
    )
    prefixes = {r.prompt_token_ids[:50] for r in requests}
    assert len(prefixes) == 3 and all(r.prompt_len == 55 and r.output_len == 7 for r in requests)
    assert requests == build_shared_prefix_workload(text, 40, 3, 50, 5, 7)  # seeded
    assert requests != build_shared_prefix_workload(text, 40, 3, 50, 5, 7, seed=1)


def test_the_table_shows_hit_rate_and_mean_ttft_per_policy():
    table = format_results(
        [PolicyResult("prefix", 750, 1000, 120.4, 2.5, 0), PolicyResult("random", 250, 1000, 480.0, 1.0, 0)]
    )
    assert table.splitlines()[2:] == [
        "| prefix | 75.0% (750 / 1000 tokens) | 120 | 2.50 |",
        "| random | 25.0% (250 / 1000 tokens) | 480 | 1.00 |",
    ]


def test_ttfb_stats_take_median_and_p95_by_linear_interpolation():
    stats = TTFBStats("direct", tuple(float(v) for v in range(1, 21)))  # 1 .. 20 ms
    assert stats.median_ms == 10.5
    assert stats.p95_ms == 19.05  # 1 + 0.95 x 19
    assert TTFBStats("router", (7.0, 3.0, 5.0)).median_ms == 5.0  # order does not matter


def test_the_ttfb_table_shows_each_path_and_the_routers_difference_and_ratio():
    direct = TTFBStats("direct", (100.0, 100.0, 120.0))
    routed = TTFBStats("router", (103.0, 104.0, 126.0))
    assert format_ttfb(direct, routed).splitlines() == [
        "| path | requests | median TTFB (ms) | p95 TTFB (ms) |",
        "|---|---|---|---|",
        "| direct | 3 | 100.0 | 118.0 |",
        "| router | 3 | 104.0 | 123.8 |",
        "| router - direct | | +4.0 (x1.040) | +5.8 (x1.049) |",
    ]


def test_bench_router_ttfb_is_a_mode_of_bench_router():
    import argparse

    from kvpilot.serving.bench import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "router", "--ttfb", "--ttfb-requests", "7", "--output-len", "2"])
    assert (args.ttfb, args.ttfb_requests, args.output_len) == (True, 7, 2)


def test_process_cpu_seconds_reads_proc_and_grows_with_work():
    before = process_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # 0.2 s of CPU
        pass
    after = process_cpu_seconds(os.getpid())
    assert before is not None and after is not None and after - before >= 0.15
    assert process_cpu_seconds(2**22 + 1) is None  # no such process (above the kernel's pid_max)
