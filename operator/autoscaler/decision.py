"""The autoscaling decision, pure: (policy, samples, current replicas, now, state) -> Decision.

After Knative's KPA: the demand (the metric summed over the ready replicas) is averaged over a
stable window (60 s) and a short panic window (6 s). When the panic window's demand reaches
`panic_threshold` times what the ready replicas can take, the autoscaler panics: it follows the
short window and never scales down, until the threshold has not been crossed for a stable window.
Then, as HPA's behaviour block: scale-down stabilization (the highest recommendation of the last
`scale_down_delay` wins), rates per decision (up: `max_scale_up_rate` times, at least +1; down:
divided by `max_scale_down_rate`), and the min/max bounds. With min 0 the count reaches zero only
after `scale_to_zero_after` with nothing running, waiting or queued; from zero, requests queued at
the router bring one replica at once. No measurement means no change (never down on missing data),
and a gap in the measurements counts as activity: after it, scaling down waits a whole
scaleDownDelay (to zero, scaleToZeroAfter) of measurements again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvpilot.operator.autoscaler.policy import Policy, Sample

STABLE, PANIC = "stable", "panic"


@dataclass(frozen=True)
class State:
    """What one decision hands the next (the loop keeps it; the replay threads it through)."""

    panic_since: float | None = None  # last time the panic threshold was crossed; None: not panicking
    recommendations: tuple[tuple[float, int], ...] = ()  # (t, recommendation) within scale_down_delay
    last_active: float = 0.0  # last time something was running, waiting or queued

    @classmethod
    def start(cls, now: float, current: int, mode: str = STABLE) -> State:
        """A fresh autoscaler (first run, or after an operator restart) is conservative: it counts
        the current replicas as a recommendation (no scale-down for a scale_down_delay), the present
        as activity (no scale to zero for a scale_to_zero_after) and resumes a recorded panic."""
        return cls(
            panic_since=now if mode == PANIC else None, recommendations=((now, current),), last_active=now
        )


@dataclass(frozen=True)
class Decision:
    desired: int
    mode: str  # stable | panic
    reason: str
    value: float | None  # the metric per ready replica over the stable window
    state: State
    active: bool = True  # ScalingActive: the decision rests on measurements
    active_reason: str = "ValidMetricFound"
    limited: str | None = None  # ScalingLimited reason: TooFewReplicas, TooManyReplicas, ScaleUpLimit, ...


def _fmt(seconds: float) -> str:
    return f"{seconds:g}s"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _recommendations(
    policy: Policy, state: State, now: float, recommendation: int
) -> tuple[tuple[float, int], ...]:
    """The scale-down window's recommendations, with this one."""
    recent = tuple((t, r) for t, r in state.recommendations if t > now - policy.scale_down_delay)
    return (*recent, (now, recommendation))


def _bounds(policy: Policy, current: int, now: float, last_active: float) -> tuple[int, str | None]:
    """The lowest count allowed now, and why it is above min_replicas (the scale-to-zero grace)."""
    if policy.min_replicas > 0 or current == 0:
        return policy.min_replicas, None
    idle = now - last_active
    if idle < policy.scale_to_zero_after:
        return 1, f"idle {_fmt(idle)} of scaleToZeroAfter {_fmt(policy.scale_to_zero_after)}"
    return 0, None


def decide(policy: Policy, samples: Sequence[Sample], current: int, now: float, state: State) -> Decision:
    """The desired replica count of the whole InferenceService (a rollout shares it out by weight)."""
    window = [s for s in samples if now - policy.stable_window < s.t <= now]
    latest = window[-1] if window else None
    last_active = max([state.last_active] + [s.t for s in window if s.is_idle is False])
    state = replace(state, last_active=last_active)
    mode = PANIC if state.panic_since is not None else STABLE

    if current == 0 and latest is not None and (latest.queued or 0) > 0:
        desired = min(max(1, policy.min_replicas), policy.max_replicas)
        recommendations = (*state.recommendations, (now, desired))
        reason = f"{latest.queued:g} requests queued at the router at zero replicas: {desired} at once"
        state = replace(state, recommendations=recommendations, last_active=now)
        return Decision(desired, mode, reason, None, state)

    lowest, grace = _bounds(policy, current, now, last_active)
    held = min(max(current, lowest), policy.max_replicas)
    no_router = current == 0 and (latest is None or latest.queued is None)
    if latest is None or latest.total(policy.metric) is None or no_router:
        if no_router:
            why, what = (
                "NoRouterMetrics",
                "no router answered: at zero replicas only its queued requests scale up",
            )
        else:
            why, what = "FailedGetMetrics", f"no {policy.metric} from any ready pod"
        reason = f"{what}; holding at {held}"
        # A gap proves nothing idle: it counts as activity and as a recommendation to hold, so that
        # scaling down (or to zero) afterwards takes a whole scaleDownDelay (scaleToZeroAfter) of
        # measurements again, not one idle sample after the gap.
        recommendations = _recommendations(policy, state, now, held)
        state = replace(state, recommendations=recommendations, last_active=now if current else last_active)
        return Decision(held, mode, reason, None, state, active=False, active_reason=why)

    measured = [(s.t, s.total(policy.metric), s.ready_replicas) for s in window]
    measured = [(t, total, ready) for t, total, ready in measured if total is not None]
    stable_total = _mean([total for _, total, _ in measured])
    panic_total = _mean(
        [total for t, total, _ in measured if t > now - policy.panic_window] or [measured[-1][1]]
    )
    # Capacity is at most the replicas it scales: a BlueGreen preview's (or a surge's) extra ready
    # pods take little or none of the traffic, and counting them hid a 2x overload as "within tolerance".
    ready = max(1, min(latest.ready_replicas, current) if current else latest.ready_replicas)
    value = stable_total / ready
    stable_want = math.ceil(stable_total / policy.target)
    panic_want = math.ceil(panic_total / policy.target)

    panic_since = state.panic_since
    if panic_want / ready >= policy.panic_threshold:
        panic_since = now
    elif panic_since is not None and now - panic_since >= policy.stable_window:
        panic_since = None
    if panic_since is not None:
        mode, raw = PANIC, max(panic_want, current)
        reason = (
            f"panic: {policy.metric} {panic_total:.3g} over {_fmt(policy.panic_window)} is "
            f"{panic_want / ready:.2g}x the {ready} ready replicas' capacity (threshold "
            f"{policy.panic_threshold:g}): wants {panic_want}, never fewer than {current}"
        )
    elif current > 0 and abs(value / policy.target - 1) <= policy.tolerance:
        mode, raw = STABLE, current
        reason = (
            f"stable: {policy.metric} {value:.3g} per replica over {_fmt(policy.stable_window)} is within "
            f"tolerance {policy.tolerance:g} of target {policy.target:g}"
        )
    else:
        mode, raw = STABLE, stable_want
        reason = (
            f"stable: {policy.metric} {value:.3g} per replica over {_fmt(policy.stable_window)} vs target "
            f"{policy.target:g}: wants {stable_want}"
        )

    # Scale-down stabilization (HPA's): down only as far as the window's highest recommendation.
    recommendations = _recommendations(policy, state, now, raw)
    highest = max(r for _, r in recommendations)
    stabilized = raw if raw >= current else min(current, highest)
    if stabilized != raw:
        reason += f"; scaleDownDelay {_fmt(policy.scale_down_delay)} keeps {stabilized}"

    limited = None
    up_limit = max(math.ceil(current * policy.max_scale_up_rate), current + 1)
    down_limit = math.floor(current / policy.max_scale_down_rate)
    desired = stabilized
    if desired > up_limit:
        desired, limited = up_limit, "ScaleUpLimit"
        reason += f"; maxScaleUpRate {policy.max_scale_up_rate:g} allows {up_limit}"
    elif desired < down_limit:
        desired, limited = down_limit, "ScaleDownLimit"
        reason += f"; maxScaleDownRate {policy.max_scale_down_rate:g} allows {down_limit}"

    if desired < lowest:
        desired = lowest
        if grace:
            reason += f"; {grace}: keeps {lowest}"
        else:
            limited = "TooFewReplicas"
            reason += f"; minReplicas {lowest}"
    elif desired > policy.max_replicas:
        desired, limited = policy.max_replicas, "TooManyReplicas"
        reason += f"; maxReplicas {policy.max_replicas}"
    if desired == 0 and current > 0:
        reason += f"; idle for {_fmt(now - last_active)}: scale to zero"
    state = State(panic_since=panic_since, recommendations=recommendations, last_active=last_active)
    return Decision(desired, mode, reason, value, state, limited=limited)
