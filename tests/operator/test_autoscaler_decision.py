"""The autoscaling decision, table by table: each case runs the pure function tick by tick (every
2 s, as the loop does) over a load shape, closed-loop (ready replicas follow the decision at once)
unless the case says otherwise, and asserts the exact trace."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace

import pytest
from kvpilot.operator.api.spec import AutoscalingSpec
from kvpilot.operator.autoscaler.decision import PANIC, STABLE, Decision, State, decide
from kvpilot.operator.autoscaler.policy import Policy, Sample

# concurrency, one request per replica; short delays so the cases stay short.
POLICY = Policy(min_replicas=1, max_replicas=20, metric="concurrency", target=1.0, scale_down_delay=20.0)
NO_DELAY = replace(POLICY, scale_down_delay=0.0)


def run(
    policy: Policy, demand: Callable[[float], float | None], current: int, until: float, **extra: float
) -> list[tuple[float, int, Decision]]:
    """(t, replicas before, decision) per tick; demand(t): the total in flight (None: no pod answered)."""
    state, samples, trace, t = State.start(0.0, current), [], [], 0.0
    while t <= until:
        load = demand(t)
        fields = {} if load is None else {"running": load, "waiting": 0.0, **extra}
        samples.append(Sample(t=t, ready_replicas=current, **fields))
        decision = decide(policy, samples, current, t, state)
        trace.append((t, current, decision))
        current, state = decision.desired, decision.state
        t += 2.0
    return trace


def changes(trace) -> list[tuple[float, int, int, str]]:
    return [(t, before, d.desired, d.mode) for t, before, d in trace if d.desired != before]


def test_steady_load_at_target_changes_nothing():
    trace = run(POLICY, lambda t: 4.2 if int(t) % 4 else 3.9, current=4, until=200)
    assert changes(trace) == []
    assert all(d.mode == STABLE and d.active for _, _, d in trace)
    assert "within tolerance 0.1 of target 1" in trace[-1][2].reason


def test_steady_load_outside_a_zero_tolerance_is_followed():
    trace = run(replace(POLICY, tolerance=0.0), lambda t: 4.2, current=4, until=10)
    assert changes(trace)[0][:3] == (0.0, 4, 5)


def test_a_ramp_is_followed_in_stable_mode():
    trace = run(POLICY, lambda t: 2 + t / 20, current=2, until=200)  # 2 -> 12 over 200 s
    assert all(d.mode == STABLE for _, _, d in trace)
    desired = [d.desired for _, _, d in trace]
    assert desired == sorted(desired)  # up only
    assert desired[0] == 2 and desired[-1] >= 9  # the 60 s average lags the ramp's 12
    assert all(after - before == 1 for _, before, after, _ in changes(trace))  # small steps


def test_a_3x_burst_panics_up_within_one_panic_window_and_never_down_while_panicking():
    def burst(t: float) -> float:
        return 6.0 if 100 <= t < 130 else 2.0

    trace = run(POLICY, burst, current=2, until=240)
    by_time = {t: (before, d) for t, before, d in trace}
    assert by_time[98][1].desired == 2 and by_time[98][1].mode == STABLE
    assert by_time[100][1].mode == PANIC and "panic" in by_time[100][1].reason
    reached = min(t for t, _, d in trace if d.desired >= 6)
    assert reached - 100 < POLICY.panic_window
    panicking = [d for _, _, d in trace if d.mode == PANIC]
    assert panicking and all(b.desired >= a.desired for a, b in itertools.pairwise(panicking))
    # Panic lasts a stable window after the burst's last panic signal, then the count comes down.
    assert by_time[150][1].mode == PANIC and by_time[150][1].desired == 6
    assert trace[-1][2].mode == STABLE and trace[-1][2].desired == 2


def test_flapping_around_the_target_does_not_oscillate_thanks_to_scale_down_delay():
    def flap(t: float) -> float:
        return 5.0 if int(t // 10) % 2 else 3.0  # 3 and 5 around 4 every 10 s

    steady = run(replace(POLICY, stable_window=6.0, panic_window=2.0), flap, current=4, until=300)
    assert len(changes(steady)) <= 1  # up to 5 once, then held
    nervous = run(replace(POLICY, stable_window=6.0, panic_window=2.0, scale_down_delay=0.0), flap, 4, 300)
    assert len(changes(nervous)) > 20  # the same load without the delay flaps


def test_idle_goes_to_zero_only_after_scale_to_zero_after():
    policy = replace(
        POLICY,
        min_replicas=0,
        scale_to_zero_after=30.0,
        scale_down_delay=10.0,
        stable_window=6.0,
        panic_window=2.0,
    )
    trace = run(policy, lambda t: 1.0 if t < 10 else 0.0, current=1, until=60)
    # Active until t=8 (the last busy sample); the windows say 0 from t=22, but zero comes only at
    # 8 + 30 s, not one tick before.
    assert changes(trace) == [(38.0, 1, 0, STABLE)]
    assert "keeps 1" in {t: d for t, _, d in trace}[36.0].reason
    assert "scale to zero" in {t: d for t, _, d in trace}[38.0].reason


def test_queued_at_the_router_at_zero_brings_one_replica_at_once():
    policy = replace(POLICY, min_replicas=0)
    samples = [Sample(t=0.0, ready_replicas=0, running=0.0, waiting=0.0, queued=3)]
    decision = decide(policy, samples, current=0, now=0.0, state=State.start(0.0, 0))
    assert (decision.desired, decision.mode) == (1, STABLE)
    assert "3 requests queued at the router at zero replicas" in decision.reason
    # Nothing queued at zero: stay at zero.
    idle = [replace(samples[0], queued=0)]
    assert decide(policy, idle, current=0, now=0.0, state=State.start(0.0, 0)).desired == 0


def test_at_zero_without_the_router_it_holds_and_says_why():
    policy = replace(POLICY, min_replicas=0)
    samples = [Sample(t=0.0, ready_replicas=0, running=0.0, waiting=0.0)]
    decision = decide(policy, samples, current=0, now=0.0, state=State.start(0.0, 0))
    assert (decision.desired, decision.active, decision.active_reason) == (0, False, "NoRouterMetrics")


def test_missing_metrics_hold_and_scaling_is_inactive():
    # Low load for a minute would scale 6 -> 1; then no pod answers: hold, never down.
    trace = run(POLICY, lambda t: None if t >= 30 else 6.0, current=6, until=120)
    assert changes(trace) == []
    last = trace[-1][2]
    assert (last.desired, last.active, last.active_reason) == (6, False, "FailedGetMetrics")
    assert last.reason == "no concurrency from any ready pod; holding at 6"


def test_after_a_gap_in_the_metrics_scaling_down_waits_a_whole_delay_of_measurements():
    """Pods too busy to answer /metrics for minutes, then one idle sample: before, 8 -> 4 at once
    (the scale-down delay's recommendations had aged out during the gap)."""
    policy = replace(POLICY, scale_down_delay=30.0, stable_window=6.0, panic_window=2.0)
    trace = run(policy, lambda t: 8.0 if t < 10 else (None if t < 320 else 1.0), current=8, until=400)
    assert changes(trace)[0][:3] == (348.0, 8, 4)  # the gap's last tick was 318: + 30 s (was 320)


def test_after_a_gap_in_the_metrics_scale_to_zero_waits_a_whole_grace():
    policy = replace(
        POLICY,
        min_replicas=0,
        scale_to_zero_after=30.0,
        scale_down_delay=0.0,
        stable_window=6.0,
        panic_window=2.0,
    )
    trace = run(policy, lambda t: 1.0 if t < 10 else (None if t < 400 else 0.0), current=1, until=460)
    assert changes(trace) == [(428.0, 1, 0, STABLE)]  # 30 s after the gap, not at once at 400


def test_requests_queued_at_the_router_are_activity_while_the_pods_load():
    """A woken pod still loading answers no /metrics while the router holds requests: that is not
    idleness, and the first idle sample after it must not scale to zero at once."""
    assert Sample(t=0.0, ready_replicas=0, queued=3).is_idle is False
    assert Sample(t=0.0, ready_replicas=1).is_idle is None
    policy = replace(
        POLICY, min_replicas=0, scale_to_zero_after=30.0, scale_down_delay=0.0, stable_window=6.0
    )
    samples = [Sample(t=float(t), ready_replicas=0, queued=3) for t in range(0, 400, 2)]
    samples.append(Sample(t=400.0, ready_replicas=1, running=0.0, waiting=0.0, queued=0))
    decision = decide(policy, samples, current=1, now=400.0, state=State.start(0.0, 1))
    assert decision.desired == 1 and "scaleToZeroAfter" in decision.reason


def test_a_panic_window_shorter_than_the_samples_apart_does_not_divide_by_zero():
    policy = replace(POLICY, panic_window=0.5)
    samples = [Sample(t=0.0, ready_replicas=1, running=1.0, waiting=0.0)]
    assert decide(policy, samples, current=1, now=1.0, state=State.start(0.0, 1)).desired == 1


@pytest.mark.parametrize(
    ("case", "policy", "demand", "current", "expected"),
    [
        ("up rate 2x", POLICY, 50.0, 2, [(0.0, 2, 4), (2.0, 4, 8), (4.0, 8, 16), (6.0, 16, 20)]),
        ("up +1 at least", replace(POLICY, max_scale_up_rate=1.1), 5.0, 2, [(0, 2, 3), (2, 3, 4), (4, 4, 5)]),
        ("max clamp", replace(POLICY, max_replicas=3), 50.0, 2, [(0.0, 2, 3)]),
        ("down rate 2x", NO_DELAY, 0.0, 8, [(0.0, 8, 4), (2.0, 4, 2), (4.0, 2, 1)]),
        ("min clamp", replace(POLICY, min_replicas=3, scale_down_delay=0.0), 0.0, 6, [(0.0, 6, 3)]),
        ("min raises", replace(POLICY, min_replicas=3), 0.0, 1, [(0.0, 1, 3)]),
    ],
)  # fmt: skip
def test_clamps_and_rates(case, policy, demand, current, expected):
    trace = run(policy, lambda t: demand, current=current, until=12)
    assert [c[:3] for c in changes(trace)] == expected, case


@pytest.mark.parametrize(
    ("policy", "demand", "current", "limited"),
    [
        (POLICY, 50.0, 2, "ScaleUpLimit"),
        (replace(POLICY, max_replicas=3), 50.0, 2, "TooManyReplicas"),
        (replace(POLICY, scale_down_delay=0.0), 0.0, 8, "ScaleDownLimit"),
        (replace(POLICY, min_replicas=3, scale_down_delay=0.0), 0.0, 4, "TooFewReplicas"),
        (POLICY, 3.0, 3, None),
    ],
)
def test_the_limit_that_applied_is_named(policy, demand, current, limited):
    assert run(policy, lambda t: demand, current=current, until=0)[0][2].limited == limited


def test_kv_cache_usage_is_a_mean_over_the_ready_replicas():
    policy = replace(POLICY, metric="kvCacheUsage", target=0.5, tolerance=0.0)
    samples = [Sample(t=0.0, ready_replicas=4, running=1.0, waiting=0.0, kv_cache_usage=0.75)]
    decision = decide(policy, samples, current=4, now=0.0, state=State.start(0.0, 4))
    assert decision.desired == 6  # 4 x 0.75 = 3 replicas' worth at 0.5 each
    assert decision.value == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("metric", "expected"),
    [("numRequestsRunning", 3.0), ("numRequestsWaiting", 2.0), ("concurrency", 9.0), ("kvCacheUsage", 1.2)],
)
def test_sample_totals(metric, expected):
    sample = Sample(t=0, ready_replicas=3, running=3.0, waiting=2.0, kv_cache_usage=0.4, queued=4.0)
    assert sample.total(metric) == pytest.approx(expected)
    assert Sample(t=0, ready_replicas=3, queued=4.0).total(metric) is None


def test_a_restarted_autoscaler_resumes_a_recorded_panic_and_does_not_scale_down_at_once():
    samples = [Sample(t=100.0, ready_replicas=8, running=1.0, waiting=0.0)]
    resumed = decide(POLICY, samples, current=8, now=100.0, state=State.start(100.0, 8, mode=PANIC))
    assert (resumed.desired, resumed.mode) == (8, PANIC)
    fresh = decide(POLICY, samples, current=8, now=100.0, state=State.start(100.0, 8))
    assert (fresh.desired, fresh.mode) == (8, STABLE)  # scaleDownDelay counts the current 8
    assert "scaleDownDelay 20s keeps 8" in fresh.reason


def test_policy_from_the_spec_reads_durations():
    spec = AutoscalingSpec(
        max_replicas=4, target=2, stable_window="1m30s", panic_window="500ms", scale_to_zero_after="2m"
    )
    policy = Policy.from_spec(spec)
    assert (policy.stable_window, policy.panic_window, policy.scale_to_zero_after) == (90.0, 0.5, 120.0)
    assert (policy.scale_down_delay, policy.initial_delay, policy.metric) == (300.0, 0.0, "kvCacheUsage")


def test_ready_pods_beyond_the_replicas_it_scales_add_no_capacity():
    """A BlueGreen preview: 4 replicas serve, 4 preview pods are ready and idle. Demand 32 at a
    target of 4 per replica wants 8; counted over 8 ready pods it read "within tolerance"."""
    policy = replace(POLICY, target=4.0, tolerance=0.1)
    samples = [Sample(t=float(t), ready_replicas=8, running=32.0, waiting=0.0) for t in range(0, 60, 2)]
    decision = decide(policy, samples, current=4, now=58.0, state=State.start(0.0, 4))
    assert decision.desired == 8 and decision.value == 8.0
