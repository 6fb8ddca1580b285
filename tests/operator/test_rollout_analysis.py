"""Analysis of a revision's traffic from real Prometheus text as the router exports it."""

import datetime

import pytest
from kvpilot.operator.api import AnalysisSpec, RolloutStatus
from kvpilot.operator.rollout.analysis import (
    RevisionCounters,
    analyze,
    check_counters,
    engine_counters,
    histogram_quantile,
    is_due,
    reads_router,
    revision_counters,
)
from kvpilot.operator.rollout.scrape import analysis_metrics_urls
from kvpilot.serving.contract import METRIC_REQUEST_SUCCESS, METRIC_TIME_TO_FIRST_TOKEN
from kvpilot.serving.router.metering import RouterMetrics
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0)


def router_page(requests: dict[tuple[str, str], int], ttfts: dict[str, list[float]]) -> str:
    """A router's /metrics page, from the router's own metrics: requests by (revision, code)."""
    metrics = RouterMetrics()
    for (revision, code), count in requests.items():
        metrics.requests.labels("smollm2", revision, "team-a", code).inc(count)
    for revision, values in ttfts.items():
        for value in values:
            metrics.time_to_first_token.labels("smollm2", revision).observe(value)
    return generate_latest(metrics.registry).decode()


def test_counters_are_summed_over_router_replicas_for_one_revision_only():
    pages = [
        router_page({("b", "200"): 30, ("b", "500"): 2, ("a", "200"): 500}, {"b": [0.05] * 30}),
        router_page({("b", "200"): 18}, {"b": [0.7] * 18, "a": [3.0] * 10}),
    ]
    counters = revision_counters(pages, "smollm2", "b")
    assert counters.requests == {"200": 48.0, "500": 2.0}
    assert counters.ttft_buckets[0.1] == 30 and counters.ttft_buckets[1.0] == 48
    assert counters.ttft_buckets[float("inf")] == 48


def test_histogram_quantile_interpolates_inside_the_bucket():
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    # rank 95 of 100 lies halfway through (0.5, 1.0], which holds ranks 90..100.
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.75)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, {1.0: 0.0, float("inf"): 0.0}) is None
    assert histogram_quantile(0.95, {1.0: 1.0, float("inf"): 100.0}) == 1.0  # beyond the last bound


SPEC = AnalysisSpec.model_validate(
    {"maxErrorRate": 0.02, "maxTTFTSeconds": {"p95": 2.0}, "minRequests": 50, "failureLimit": 2}
)


def test_a_check_measures_the_interval_since_its_baseline():
    before = revision_counters([router_page({("b", "200"): 100, ("b", "503"): 50}, {})], "smollm2", "b")
    after = revision_counters(
        [router_page({("b", "200"): 197, ("b", "503"): 53}, {"b": [0.3] * 100})], "smollm2", "b"
    )
    result = analyze(SPEC, after, before, NOW)
    assert (result.requests, result.passed) == (100, False)
    assert result.error_rate == pytest.approx(0.03)
    assert "error rate 0.030 > maxErrorRate 0.02" in result.message
    # The counters are the next baseline, and survive the status's JSON.
    assert RevisionCounters.from_status(result.counters) == after


def test_slow_first_tokens_fail_and_a_healthy_interval_passes():
    slow = revision_counters([router_page({("b", "200"): 60}, {"b": [4.0] * 60})], "smollm2", "b")
    result = analyze(SPEC, slow, None, NOW)
    # 60 at 4 s, all in the (2.5, 5] bucket: rank 57 of 60 -> 2.5 + 2.5 * 0.95
    assert result.passed is False and "TTFT p95 4.875s > maxTTFTSeconds.p95 2.0" in result.message
    fast = revision_counters([router_page({("b", "200"): 60}, {"b": [0.2] * 60})], "smollm2", "b")
    result = analyze(SPEC, fast, None, NOW)
    assert result.passed is True and result.error_rate == 0.0 and result.ttft_p95 < 0.5


def test_too_few_requests_are_inconclusive_and_a_reset_counter_counts_from_zero():
    baseline = RevisionCounters({"200": 1000.0, "500": 10.0}, {})
    restarted = RevisionCounters({"200": 20.0, "500": 20.0}, {})  # a router replica restarted
    result = analyze(SPEC, restarted, baseline, NOW)
    assert result.requests == 40 and result.passed is None
    assert "fewer than minRequests 50, inconclusive" in result.message


def rollout(strategy: str = "Canary", phase: str = "Progressing", weight: int = 0) -> RolloutStatus:
    return RolloutStatus(
        phase=phase, revision="b", stable_revision="a", strategy=strategy, canary_weight=weight
    )


def test_a_check_is_due_once_the_revision_has_traffic_and_an_interval_passed():
    assert not is_due(None, SPEC, rollout(weight=0), NOW)
    assert is_due(None, SPEC, rollout(weight=10), NOW)
    last = analyze(SPEC, RevisionCounters({}, {}), None, NOW)
    assert not is_due(last, SPEC, rollout(weight=10), NOW + datetime.timedelta(seconds=59))
    assert is_due(last, SPEC, rollout(weight=10), NOW + datetime.timedelta(seconds=60))
    assert not is_due(last, None, rollout(weight=10), NOW + datetime.timedelta(hours=1))


@pytest.mark.parametrize("phase", ["Progressing", "Paused"])
def test_a_blue_green_preview_is_checked_at_weight_0_on_its_own_engine_pods(phase):
    """The router sends a revision at weight 0 nothing; `<name>-preview` reaches its pods past the
    router, so only their counters hold the preview's requests."""
    preview = rollout("BlueGreen", phase)
    assert is_due(None, SPEC, preview, NOW)
    assert not reads_router(preview, router_enabled=True)
    assert reads_router(rollout(weight=10), router_enabled=True)  # a canary's share: the router's
    assert not reads_router(rollout(weight=10), router_enabled=False)
    assert not is_due(None, SPEC, rollout("BlueGreen", "Promoted"), NOW)  # promoted: nothing to check


def engine_page(finished: int, ttft: float) -> str:
    """An engine pod's /metrics, with the server's metric names (serving/contract.py)."""
    registry = CollectorRegistry()
    success = Counter(METRIC_REQUEST_SUCCESS, "ok", ["model_name", "finished_reason"], registry=registry)
    success.labels("smollm2", "length").inc(finished)
    histogram = Histogram(
        METRIC_TIME_TO_FIRST_TOKEN, "ttft", ["model_name"], buckets=BUCKETS, registry=registry
    )
    for _ in range(finished):
        histogram.labels("smollm2").observe(ttft)
    return generate_latest(registry).decode()


def test_engine_pages_give_requests_and_ttft_but_no_error_rate():
    counters = engine_counters([engine_page(40, 0.05), engine_page(20, 3.0)])
    assert counters.requests == {"engine": 60.0}
    result = analyze(SPEC, counters, None, NOW)
    assert result.error_rate is None and "error rate n/a" in result.message
    assert result.passed is False and "TTFT p95" in result.message  # 20 of 60 slower than 2 s


def pod(
    name: str, revision: str | None, ip: str, ready: bool = True, terminating: bool = False, port: int = 8000
) -> dict:
    """An engine pod of `revision`, or a router pod (revision None, the router's port)."""
    labels = {"kvpilot.dev/revision": revision} if revision else {"app.kubernetes.io/name": "kvpilot-router"}
    metadata = {"name": name, "labels": labels}
    if terminating:
        metadata["deletionTimestamp"] = "2026-12-01T12:00:00Z"
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    spec = {"containers": [{"ports": [{"name": "http", "containerPort": port}]}]}
    return {"metadata": metadata, "spec": spec, "status": {"podIP": ip, "conditions": conditions}}


ENGINE_PODS = [
    pod("a-1", "a", "10.0.0.1"),
    pod("b-1", "b", "10.0.0.7"),
    pod("b-2", "b", "10.0.0.8", ready=False),
    pod("b-3", "b", "10.0.0.9", terminating=True),
]
ROUTER_PODS = [
    pod("r-1", None, "10.0.1.1", port=8080),
    pod("r-2", None, "10.0.1.2", port=8080),
    pod("r-3", None, "10.0.1.3", ready=False, port=8080),
]


@pytest.mark.parametrize(
    ("router_pods", "expected"),
    [
        # The router in front: every ready router pod (each counts a share of the traffic).
        (ROUTER_PODS, ["http://10.0.1.1:8080/metrics", "http://10.0.1.2:8080/metrics"]),
        # The router on but no router pod ready: nothing to read (inconclusive), never the engines'.
        (ROUTER_PODS[2:], []),
        # No router: the revision's own ready engine pods.
        (None, ["http://10.0.0.7:8000/metrics"]),
    ],
)
def test_a_check_reads_the_router_pods_or_without_the_router_the_revisions_engine_pods(router_pods, expected):
    assert analysis_metrics_urls("b", ENGINE_PODS, router_pods) == expected


def test_router_pages_give_the_revisions_error_rate_with_the_routers_own_5xx():
    """500 passed through from the canary's server and 502 the router answered itself (its
    upstream failed before answering) are both the revision's errors; refusals the router
    answered before choosing a revision (revision "") and other revisions are not."""
    page = router_page(
        {("b", "200"): 45, ("b", "500"): 3, ("b", "502"): 2, ("", "503"): 40, ("a", "500"): 9}, {}
    )
    counters = check_counters([page], "smollm2", "b", via_router=True)
    result = analyze(SPEC, counters, None, NOW)
    assert (result.requests, result.error_rate, result.passed) == (50, 0.1, False)
    assert "error rate 0.100 > maxErrorRate 0.02" in result.message
    engine = check_counters([engine_page(40, 0.05)], "smollm2", "b", via_router=False)
    assert engine.requests == {"engine": 40.0}


def test_router_traffic_lists_each_kept_revision_with_its_weight_and_ready_endpoints():
    from kvpilot.operator.rollout.observe import revision_traffic
    from kvpilot.operator.rollout.state import RevisionPlan, RolloutPlan
    from kvpilot.operator.router_config import RevisionEndpoints

    plan = RolloutPlan(
        revisions={"a": RevisionPlan(3, 90, "Active"), "b": RevisionPlan(1, 10, "Canary")},
        delete=[],
        status=None,
        events=[],
        requeue_after=None,
    )
    pods = [
        pod("a-1", "a", "10.0.0.2"),
        pod("a-2", "a", "10.0.0.1"),
        pod("a-3", "a", "10.0.0.3", terminating=True),  # draining: no new requests
        pod("b-1", "b", "10.0.0.7", ready=False),
    ]
    assert revision_traffic(plan, pods) == [
        RevisionEndpoints("a", 90, ("http://10.0.0.1:8000", "http://10.0.0.2:8000")),
        RevisionEndpoints("b", 10, ()),  # not ready yet: the router gives its share to the others
    ]
