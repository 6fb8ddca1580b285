"""Serving metrics computed from recorded timestamps: pure functions, no I/O.

Definitions follow vLLM's `benchmark_serving`:
- TTFT: first token arrival - request start.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: the gaps between successive streamed chunks of one request, over all requests.
- E2E: last byte - request start.
"""

import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the client saw for one request (times in seconds, one monotonic clock)."""

    start: float
    prompt_len: int
    chunk_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk with tokens
    end: float | None = None
    output_len: int = 0  # completion tokens (from the usage chunk when the server sends one)
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None and self.end is not None and bool(self.chunk_times)


@dataclass(frozen=True)
class LatencyStats:
    mean: float
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True)
class ServingMetrics:
    duration_s: float
    completed: int
    errors: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # requests/s
    output_token_throughput: float  # tokens/s
    total_token_throughput: float  # (input + output) tokens/s
    ttft_s: LatencyStats
    tpot_s: LatencyStats
    itl_s: LatencyStats
    e2e_s: LatencyStats

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(values: list[float]) -> LatencyStats:
    """Mean and percentiles (linear interpolation, as numpy and vLLM); zeros for no values."""
    if not values:
        return LatencyStats(0.0, 0.0, 0.0, 0.0)
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = (float(np.percentile(array, p)) for p in PERCENTILES)
    return LatencyStats(mean=float(array.mean()), p50=p50, p90=p90, p99=p99)


def ttft(record: RequestRecord) -> float:
    return record.chunk_times[0] - record.start


def e2e(record: RequestRecord) -> float:
    assert record.end is not None
    return record.end - record.start


def tpot(record: RequestRecord) -> float | None:
    if record.output_len < 2:
        return None
    return (e2e(record) - ttft(record)) / (record.output_len - 1)


def itls(record: RequestRecord) -> list[float]:
    times = record.chunk_times
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def compute_metrics(records: list[RequestRecord], duration_s: float) -> ServingMetrics:
    """Aggregate per-request records of one benchmark run that took `duration_s` seconds."""
    if duration_s <= 0:
        raise ValueError(f"duration_s: must be > 0, got {duration_s}")
    done = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    return ServingMetrics(
        duration_s=duration_s,
        completed=len(done),
        errors=len(records) - len(done),
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) / duration_s,
        output_token_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        ttft_s=latency_stats([ttft(r) for r in done]),
        tpot_s=latency_stats([t for r in done if (t := tpot(r)) is not None]),
        itl_s=latency_stats([gap for r in done for gap in itls(r)]),
        e2e_s=latency_stats([e2e(r) for r in done]),
    )


def format_metrics(metrics: ServingMetrics) -> str:
    """A readable table like vLLM's benchmark_serving summary."""
    rows = [
        ("Successful requests", f"{metrics.completed}"),
        ("Failed requests", f"{metrics.errors}"),
        ("Benchmark duration (s)", f"{metrics.duration_s:.2f}"),
        ("Total input tokens", f"{metrics.total_input_tokens}"),
        ("Total generated tokens", f"{metrics.total_output_tokens}"),
        ("Request throughput (req/s)", f"{metrics.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{metrics.output_token_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{metrics.total_token_throughput:.2f}"),
    ]
    for label, stats in (
        ("TTFT", metrics.ttft_s),
        ("TPOT", metrics.tpot_s),
        ("ITL", metrics.itl_s),
        ("E2E latency", metrics.e2e_s),
    ):
        rows += [
            (f"Mean {label} (ms)", f"{stats.mean * 1e3:.2f}"),
            (f"P50 {label} (ms)", f"{stats.p50 * 1e3:.2f}"),
            (f"P90 {label} (ms)", f"{stats.p90 * 1e3:.2f}"),
            (f"P99 {label} (ms)", f"{stats.p99 * 1e3:.2f}"),
        ]
    width = max(len(label) for label, _ in rows) + 2
    lines = ["=" * (width + 12), " Serving Benchmark Result ".center(width + 12, "=")]
    lines += [f"{label:<{width}}{value:>12}" for label, value in rows]
    lines.append("=" * (width + 12))
    return "\n".join(lines)
