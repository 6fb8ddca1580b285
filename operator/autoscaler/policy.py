"""The autoscaler's inputs as plain values: the policy (from spec.autoscaling) and one metrics sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvpilot.operator.api.spec import AutoscalingSpec
from kvpilot.operator.api.validation import duration_seconds


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    metric: str  # kvCacheUsage | numRequestsWaiting | numRequestsRunning | concurrency
    target: float  # per replica
    stable_window: float = 60.0  # seconds, as every duration here
    panic_window: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 2.0
    max_scale_down_rate: float = 2.0
    scale_down_delay: float = 300.0
    scale_to_zero_after: float = 300.0
    tolerance: float = 0.1
    initial_delay: float = 0.0

    @classmethod
    def from_spec(cls, spec: AutoscalingSpec) -> Policy:
        return cls(
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            metric=spec.metric,
            target=spec.target,
            stable_window=duration_seconds(spec.stable_window),
            panic_window=duration_seconds(spec.panic_window),
            panic_threshold=spec.panic_threshold,
            max_scale_up_rate=spec.max_scale_up_rate,
            max_scale_down_rate=spec.max_scale_down_rate,
            scale_down_delay=duration_seconds(spec.scale_down_delay),
            scale_to_zero_after=duration_seconds(spec.scale_to_zero_after),
            tolerance=spec.tolerance,
            initial_delay=duration_seconds(spec.initial_delay),
        )


@dataclass(frozen=True)
class Sample:
    """One observation of the whole InferenceService. `running`/`waiting` are sums over the ready
    pods, `kv_cache_usage` their mean, `queued` the router's queued requests; None = not measured."""

    t: float  # seconds (any epoch; only differences matter)
    ready_replicas: int
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    queued: float | None = None

    def total(self, metric: str) -> float | None:
        """The metric summed over the ready replicas (the demand), or None when not measured."""
        if metric == "numRequestsRunning":
            return self.running
        if metric == "numRequestsWaiting":
            return self.waiting
        if metric == "kvCacheUsage":
            return None if self.kv_cache_usage is None else self.kv_cache_usage * self.ready_replicas
        if self.running is None or self.waiting is None:  # concurrency
            return None
        return self.running + self.waiting + (self.queued or 0.0)

    def to_record(self) -> dict[str, float]:
        """The sample as a line of `kvpilot autoscale replay --metrics` (unmeasured keys left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def is_idle(self) -> bool | None:
        """Nothing running, waiting or queued; None when the engines were not measured (but
        requests queued at the router are activity, measured or not: a pod still loading)."""
        if self.queued:
            return False
        if self.running is None or self.waiting is None:
            return None
        return self.running + self.waiting + (self.queued or 0.0) == 0
