import argparse
import json
import math

import pytest
from kvpilot.serving.bench.metrics import compute_metrics
from kvpilot.serving.bench.serve import (
    STRUCTURED_SCHEMA,
    ServeBenchConfig,
    add_parser,
    arrival_delays,
    completion_body,
    run_benchmark,
    workload_spec_from_args,
)
from kvpilot.serving.bench.workload import WorkloadRequest


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kvpilot bench")
    add_parser(root.add_subparsers(dest="command"))
    return root


def test_arrivals_are_a_seeded_poisson_process():
    assert arrival_delays(4, math.inf, seed=0) == [0.0] * 4
    delays = arrival_delays(4000, 20.0, seed=1)
    assert delays == arrival_delays(4000, 20.0, seed=1)
    assert delays[0] == 0.0 and all(d >= 0 for d in delays)
    assert sum(delays) / len(delays) == pytest.approx(1 / 20.0, rel=0.1)


def test_completion_body_asks_for_exactly_output_len_tokens():
    body = completion_body("m", WorkloadRequest("r", (3, 4, 5), output_len=7))
    assert body["prompt"] == [3, 4, 5]
    assert (body["max_tokens"], body["ignore_eos"], body["stream"]) == (7, True, True)
    assert body["stream_options"] == {"include_usage": True}


def test_cli_flags_shape_the_workload():
    args = parser().parse_args(
        ["serve", "--base-url", "http://h:1", "--num-prompts", "3", "--input-len", "20", "--output-len", "9"]
    )
    assert args.request_rate == math.inf and args.max_concurrency is None
    spec = workload_spec_from_args(args)
    assert (spec.num_prompts, spec.min_input_len, spec.max_input_len, spec.min_output_len) == (3, 20, 20, 9)
    args = parser().parse_args(["serve", "--base-url", "http://h:1", "--request-rate", "2.5"])
    assert args.request_rate == 2.5
    assert workload_spec_from_args(args).max_output_len == 512


@pytest.mark.parametrize(
    "flags", [["--request-rate", "0"], ["--max-concurrency", "0"], ["--num-prompts", "-1"], []]
)
def test_bad_flags_are_rejected(flags, capsys):
    base = [] if not flags else ["--base-url", "http://h:1"]
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", *base, *flags])
    assert "error" in capsys.readouterr().err


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="request_rate"):
        ServeBenchConfig(base_url="http://h:1", request_rate=-1.0)
    with pytest.raises(ValueError, match="max_concurrency"):
        ServeBenchConfig(base_url="http://h:1", max_concurrency=0)


@pytest.fixture(scope="module")
def server(tiny_llama):
    from tests.serving.api.conftest import ServerThread, tiny_settings

    running = ServerThread(tiny_settings(tiny_llama)).start()
    yield running
    running.stop()


REQUESTS = [WorkloadRequest(f"r{i}", tuple(range(100 + i, 108 + 2 * i)), output_len=3 + i) for i in range(6)]


async def test_benchmark_against_a_real_server(server):
    config = ServeBenchConfig(base_url=server.base_url, request_rate=50.0, max_concurrency=2, seed=0)
    run = await run_benchmark(config, REQUESTS, show_progress=False)
    records, duration = run.records, run.duration_s
    assert run.model == "tiny-llama"  # resolved from /v1/models
    assert [r.error for r in records] == [None] * 6
    assert [r.output_len for r in records] == [r.output_len for r in REQUESTS]  # ignore_eos + max_tokens
    assert [r.prompt_len for r in records] == [r.prompt_len for r in REQUESTS]
    for record in records:
        assert record.start < record.chunk_times[0] <= record.chunk_times[-1] <= record.end
    metrics = compute_metrics(records, duration)
    assert (metrics.completed, metrics.errors) == (6, 0)
    assert metrics.total_output_tokens == sum(r.output_len for r in REQUESTS)
    assert 0 < metrics.ttft_s.p50 <= metrics.e2e_s.p50 <= duration


async def test_structured_workload_gets_valid_json(server):
    """Every request of the structured workload carries the schema; the server enforces it."""
    body = completion_body("m", REQUESTS[0], "json")
    assert body["response_format"]["json_schema"]["schema"] == STRUCTURED_SCHEMA
    config = ServeBenchConfig(base_url=server.base_url, structured_output="json", seed=0)
    run = await run_benchmark(config, REQUESTS[:3], show_progress=False)
    assert [r.error for r in run.records] == [None] * 3
    assert [r.output_len for r in run.records] == [r.output_len for r in REQUESTS[:3]]
    with pytest.raises(ValueError, match="structured_output"):
        ServeBenchConfig(base_url=server.base_url, structured_output="xml")


async def test_server_errors_are_counted_not_raised(server):
    config = ServeBenchConfig(base_url=server.base_url, model="no-such-model")
    run = await run_benchmark(config, REQUESTS[:2], show_progress=False)
    assert all(r.error and r.error.startswith("HTTP 404") for r in run.records)
    assert compute_metrics(run.records, run.duration_s).errors == 2


def test_cli_run_prints_the_table_and_writes_json(server, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "serve.json"
    flags = ["--num-prompts", "3", "--input-len", "12", "--output-len", "4", "--max-concurrency", "2"]
    args = parser().parse_args(
        [
            "serve",
            "--base-url",
            server.base_url,
            "--tokenizer",
            str(tokenizer_dir),
            *flags,
            "--json",
            str(out),
        ]
    )
    assert args.run(args) == 0
    assert "Output token throughput (tok/s)" in capsys.readouterr().out
    document = json.loads(out.read_text())
    assert (document["model"], document["completed"], document["total_output_tokens"]) == (
        "tiny-llama",
        3,
        12,
    )
    assert document["total_input_tokens"] == 36 and document["request_rate"] == "inf"
    assert set(document["ttft_s"]) == {"mean", "p50", "p90", "p99"}


def test_unreachable_server_is_a_clear_error(tokenizer_dir, capsys):
    args = parser().parse_args(
        ["serve", "--base-url", "http://127.0.0.1:9", "--tokenizer", str(tokenizer_dir), "--num-prompts", "1"]
    )
    assert args.run(args) == 2
    assert "error: --base-url http://127.0.0.1:9" in capsys.readouterr().out
