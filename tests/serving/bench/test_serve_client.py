import argparse
import math

import pytest
from kvpilot.serving.bench.serve import (
    ServeBenchConfig,
    add_parser,
    arrival_delays,
    completion_body,
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
