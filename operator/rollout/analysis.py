"""Analysis of one revision's traffic from Prometheus metrics (pure).

From the router (`kvpilot_router_requests_total{model,revision,code}` and the
`kvpilot_router_time_to_first_token_seconds{model,revision}` histogram, summed over the router
replicas), or, without a router or for a BlueGreen preview (reached past the router, at weight
0), from the revision's own engine pods (`vllm:request_success_total` and
`vllm:time_to_first_token_seconds`, summed over its pods; no status codes there, so no error
rate): the requests answered since the previous check, the share of 5xx answers, and the 95th
percentile time to first token (interpolated inside its bucket, as Prometheus'
`histogram_quantile` does). The cumulative counters at a check are kept in the status
(`lastAnalysis.counters`) as the next check's baseline, so the interval survives a restart.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

from kvpilot.operator.api import AnalysisResult, AnalysisSpec, RolloutStatus
from kvpilot.operator.api.validation import duration_seconds
from kvpilot.operator.rollout.state import parse_time, rfc3339
from kvpilot.serving.contract import METRIC_REQUEST_SUCCESS, METRIC_TIME_TO_FIRST_TOKEN
from prometheus_client.parser import text_string_to_metric_families

REQUESTS_METRIC = "kvpilot_router_requests_total"
TTFT_METRIC = "kvpilot_router_time_to_first_token_seconds"
ENGINE_REQUESTS_METRIC = f"{METRIC_REQUEST_SUCCESS}_total"
ENGINE_REQUESTS_KEY = "engine"  # requests counted by an engine: finished, with no status code
TTFT_QUANTILE = 0.95


@dataclass(frozen=True)
class RevisionCounters:
    """Cumulative counters of one revision: requests by status code, TTFT histogram buckets."""

    requests: dict[str, float]
    ttft_buckets: dict[float, float]  # upper bound (le) -> cumulative count

    def to_status(self) -> dict[str, float]:
        flat = {f"requests/{code}": count for code, count in self.requests.items()}
        flat.update({f"ttft/{le}": count for le, count in self.ttft_buckets.items()})
        return flat

    @classmethod
    def from_status(cls, flat: dict[str, float]) -> RevisionCounters:
        requests, buckets = {}, {}
        for key, value in flat.items():
            kind, _, label = key.partition("/")
            if kind == "requests":
                requests[label] = value
            elif kind == "ttft":
                buckets[float(label)] = value
        return cls(requests, buckets)

    def minus(self, baseline: RevisionCounters | None) -> RevisionCounters:
        """Counts since the baseline; the whole counts when a counter went back (a router restarted)."""
        if baseline is None:
            return self
        requests = {code: n - baseline.requests.get(code, 0.0) for code, n in self.requests.items()}
        buckets = {le: n - baseline.ttft_buckets.get(le, 0.0) for le, n in self.ttft_buckets.items()}
        if any(n < 0 for n in [*requests.values(), *buckets.values()]):
            return self
        return RevisionCounters(requests, buckets)


def revision_counters(metrics_texts: list[str], model: str, revision: str) -> RevisionCounters:
    """The revision's counters summed over the given /metrics pages (one per router replica)."""
    requests: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for text in metrics_texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if labels.get("revision") != revision or labels.get("model", model) != model:
                    continue
                if sample.name == REQUESTS_METRIC:
                    code = labels.get("code", "")
                    requests[code] = requests.get(code, 0.0) + sample.value
                elif sample.name == f"{TTFT_METRIC}_bucket":
                    le = float(labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
    return RevisionCounters(requests, buckets)


def engine_counters(metrics_texts: list[str]) -> RevisionCounters:
    """A revision's counters summed over its engine pods' /metrics pages."""
    requests: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for text in metrics_texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == ENGINE_REQUESTS_METRIC:
                    requests[ENGINE_REQUESTS_KEY] = requests.get(ENGINE_REQUESTS_KEY, 0.0) + sample.value
                elif sample.name == f"{METRIC_TIME_TO_FIRST_TOKEN}_bucket":
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
    return RevisionCounters(requests, buckets)


def check_counters(pages: list[str], model: str, revision: str, via_router: bool) -> RevisionCounters:
    """The revision's counters from the pages `scrape.analysis_metrics_urls` chose: the router's
    per-revision series, or the revision's engine pods' own."""
    return revision_counters(pages, model, revision) if via_router else engine_counters(pages)


def histogram_quantile(quantile: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = quantile * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def analyze(
    spec: AnalysisSpec,
    current: RevisionCounters,
    baseline: RevisionCounters | None,
    now: datetime.datetime,
) -> AnalysisResult:
    """One check: passed, failed, or inconclusive (None) with fewer than minRequests requests."""
    delta = current.minus(baseline)
    requests = sum(delta.requests.values())
    errors = sum(n for code, n in delta.requests.items() if code.startswith("5"))
    has_codes = any(code[:1].isdigit() for code in delta.requests)
    error_rate = errors / requests if requests and has_codes else None
    ttft_p95 = histogram_quantile(TTFT_QUANTILE, delta.ttft_buckets)
    measured = f"{int(requests)} requests, error rate {_fmt(error_rate)}, TTFT p95 {_fmt(ttft_p95)}s"
    failures = []
    if spec.max_error_rate is not None and error_rate is not None and error_rate > spec.max_error_rate:
        failures.append(f"error rate {error_rate:.3f} > maxErrorRate {spec.max_error_rate}")
    limit = spec.max_ttft_seconds.p95 if spec.max_ttft_seconds else None
    if limit is not None and ttft_p95 is not None and ttft_p95 > limit:
        failures.append(f"TTFT p95 {ttft_p95:.3f}s > maxTTFTSeconds.p95 {limit}")
    if requests < spec.min_requests:
        passed, message = None, f"{measured}: fewer than minRequests {spec.min_requests}, inconclusive"
    else:
        passed = not failures
        message = f"{measured}: " + ("; ".join(failures) if failures else "passed")
    return AnalysisResult(
        time=rfc3339(now),
        requests=int(requests),
        error_rate=error_rate,
        ttft_p95=ttft_p95,
        passed=passed,
        message=message,
        counters=current.to_status(),
    )


def in_preview(rollout: RolloutStatus) -> bool:
    """A BlueGreen rollout before its promote: the new revision is at weight 0, so the router
    sends it nothing, but `<name>-preview` reaches its ready pods directly."""
    return rollout.strategy == "BlueGreen" and rollout.phase in ("Progressing", "Paused")


def receives_traffic(rollout: RolloutStatus) -> bool:
    """Whether the new revision answers requests a check can count: a canary's share of the
    router's traffic, or the requests sent to a BlueGreen preview."""
    return rollout.canary_weight > 0 or in_preview(rollout)


def reads_router(rollout: RolloutStatus, router_enabled: bool) -> bool:
    """Whether a check reads the router's per-revision counters or the new revision's engine pods'.
    The router counts only the requests it routes, by weight; a BlueGreen preview's requests
    reach its pods through `<name>-preview`, past the router, so only the pods count them (TTFT
    and requests: no status codes, so no error rate, as without the router)."""
    return router_enabled and not in_preview(rollout)


def is_due(
    last: AnalysisResult | None, spec: AnalysisSpec | None, rollout: RolloutStatus, now: datetime.datetime
) -> bool:
    """Whether a check is due: the new revision gets traffic (`receives_traffic`) and an interval
    has passed since the last check."""
    if spec is None or not receives_traffic(rollout):
        return False
    return last is None or (now - parse_time(last.time)).total_seconds() >= duration_seconds(spec.interval)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
