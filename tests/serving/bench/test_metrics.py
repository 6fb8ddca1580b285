import pytest
from kvpilot.serving.bench.metrics import (
    RequestRecord,
    compute_metrics,
    format_metrics,
    itls,
    latency_stats,
    tpot,
    ttft,
)


def records() -> list[RequestRecord]:
    return [
        RequestRecord(start=0.0, prompt_len=10, chunk_times=[0.5, 0.6, 0.8, 1.0], end=1.0, output_len=4),
        RequestRecord(start=1.0, prompt_len=20, chunk_times=[1.2, 1.5], end=1.6, output_len=2),
        RequestRecord(start=1.5, prompt_len=30, error="HTTP 500: boom"),
        RequestRecord(start=2.0, prompt_len=5, chunk_times=[2.3], end=2.3, output_len=1),
    ]


def test_per_request_latencies_from_timestamps():
    first, second, _, single = records()
    assert ttft(first) == pytest.approx(0.5)
    assert tpot(first) == pytest.approx((1.0 - 0.5) / 3)
    assert itls(first) == pytest.approx([0.1, 0.2, 0.2])
    assert ttft(second) == pytest.approx(0.2)
    assert tpot(second) == pytest.approx(0.4)
    assert tpot(single) is None  # TPOT needs at least two output tokens
    assert itls(single) == []


def test_aggregates_skip_failed_requests():
    metrics = compute_metrics(records(), duration_s=4.0)
    assert (metrics.completed, metrics.errors) == (3, 1)
    assert metrics.total_input_tokens == 10 + 20 + 5
    assert metrics.total_output_tokens == 4 + 2 + 1
    assert metrics.request_throughput == pytest.approx(3 / 4.0)
    assert metrics.output_token_throughput == pytest.approx(7 / 4.0)
    assert metrics.total_token_throughput == pytest.approx(42 / 4.0)
    # TTFT values 0.5, 0.2, 0.3; linear interpolation between order statistics.
    assert metrics.ttft_s.mean == pytest.approx(1.0 / 3)
    assert metrics.ttft_s.p50 == pytest.approx(0.3)
    assert metrics.ttft_s.p90 == pytest.approx(0.3 + 0.8 * 0.2)
    assert metrics.ttft_s.p99 == pytest.approx(0.3 + 0.98 * 0.2)
    # ITL gaps 0.1, 0.2, 0.2 (first request) and 0.3 (second).
    assert metrics.itl_s.mean == pytest.approx(0.2)
    assert metrics.itl_s.p90 == pytest.approx(0.2 + 0.7 * 0.1)
    assert metrics.tpot_s.mean == pytest.approx((1 / 6 + 0.4) / 2)
    assert metrics.e2e_s.mean == pytest.approx((1.0 + 0.6 + 0.3) / 3)
    assert metrics.e2e_s.p50 == pytest.approx(0.6)


def test_percentiles_of_one_to_hundred():
    stats = latency_stats([float(v) for v in range(1, 101)])
    assert (stats.mean, stats.p50, stats.p90, stats.p99) == pytest.approx((50.5, 50.5, 90.1, 99.01))
    assert latency_stats([]) == latency_stats([0.0])


def test_bad_duration_is_a_clear_error():
    with pytest.raises(ValueError, match="duration_s"):
        compute_metrics(records(), duration_s=0.0)


def test_table_lists_every_metric():
    table = format_metrics(compute_metrics(records(), duration_s=4.0))
    labels = ("Mean TTFT (ms)", "P99 ITL (ms)", "P90 TPOT (ms)", "P50 E2E latency (ms)", "Failed requests")
    for label in labels:
        assert label in table
    assert "Output token throughput (tok/s)" in table and "1.75" in table
