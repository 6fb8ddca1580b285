"""The router's /metrics (prometheus-client, its own registry). Tenants appear by name only,
never by key.

Series follow the config: `prune` removes those of models, revisions, endpoints and tenants that a
reload took away, so a gauge never reports an endpoint that is gone and the series do not pile up
over rollouts. A gauge series that is not 0 (requests still in flight or held) stays until it is.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from kvpilot.serving.contract import METRIC_ROUTER_QUEUED_REQUESTS, ROUTER_MODEL_LABEL
from kvpilot.serving.router.config import RouterConfig
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
NO_TENANT = ""  # the tenant label when the config has no tenants


@dataclass(frozen=True)
class ConfiguredLabels:
    """The label values one config makes live. An empty value (`model=""`: an unknown model,
    `revision=""`: answered by the router, `tenant=""`: no tenants) is always live."""

    models: frozenset[str]
    revisions: frozenset[tuple[str, str]]  # (model, revision)
    endpoints: frozenset[tuple[str, str, str]]  # (model, revision, endpoint URL)
    tenants: frozenset[str]

    @classmethod
    def of(cls, config: RouterConfig) -> "ConfiguredLabels":
        revisions = [(model.name, revision) for model in config.models for revision in model.revisions]
        return cls(
            models=frozenset(model.name for model in config.models),
            revisions=frozenset((model, revision.name) for model, revision in revisions),
            endpoints=frozenset(
                (model, revision.name, url) for model, revision in revisions for url in revision.addresses
            ),
            tenants=frozenset(tenant.name for tenant in config.tenants or ()),
        )

    def holds(self, labels: Mapping[str, str]) -> bool:
        model, revision = labels.get("model", ""), labels.get("revision", "")
        endpoint, tenant = labels.get("endpoint", ""), labels.get("tenant", "")
        return (
            (not model or model in self.models)
            and (not revision or (model, revision) in self.revisions)
            and (not endpoint or (model, revision, endpoint) in self.endpoints)
            and (not tenant or tenant in self.tenants)
        )


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvpilot_router_requests",
            "Requests answered, by HTTP status code",
            ["model", "revision", "tenant", "code"],
            registry=r,
        )
        self.tokens = Counter(
            "kvpilot_router_tokens",
            "Tokens used, from the responses' usage",
            ["model", "tenant", "kind"],
            registry=r,
        )
        self.duration = Histogram(
            "kvpilot_router_request_duration_seconds",
            "Time from request to the last byte of the response",
            ["model", "revision"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "kvpilot_router_time_to_first_token_seconds",
            "Time from request to the first byte of the response",
            ["model", "revision"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_inflight = Gauge(
            "kvpilot_router_upstream_inflight",
            "Requests in flight to each endpoint",
            ["model", "revision", "endpoint"],
            registry=r,
        )
        self.queued = Gauge(  # the operator's autoscaler scales from zero on it
            METRIC_ROUTER_QUEUED_REQUESTS,
            "Requests held while the model has no ready endpoint",
            [ROUTER_MODEL_LABEL],
            registry=r,
        )
        self.config_reloads = Counter(
            "kvpilot_router_config_reloads",
            "Config loads by result (ok, error)",
            ["result"],
            registry=r,
        )
        self.config_last_reload_ok = Gauge(
            "kvpilot_router_config_last_reload_successful", "1 when the last config load worked", registry=r,
        )  # fmt: skip

        self.labelled: list[tuple[MetricWrapperBase, tuple[str, ...]]] = [
            (self.requests, ("model", "revision", "tenant", "code")),
            (self.tokens, ("model", "tenant", "kind")),
            (self.duration, ("model", "revision")),
            (self.time_to_first_token, ("model", "revision")),
            (self.upstream_inflight, ("model", "revision", "endpoint")),
            (self.queued, (ROUTER_MODEL_LABEL,)),
        ]

    def prune(self, configured: ConfiguredLabels) -> int:
        """Remove the series whose labels the config no longer has (gauges only at 0); how many."""
        removed = 0
        for metric, names in self.labelled:
            stale: set[tuple[str, ...]] = set()
            busy: set[tuple[str, ...]] = set()
            for family in metric.collect():
                for sample in family.samples:
                    values = tuple(sample.labels[name] for name in names)
                    if not configured.holds(dict(zip(names, values, strict=True))):
                        stale.add(values)
                        if family.type == "gauge" and sample.value != 0:
                            busy.add(values)
            for values in stale - busy:
                metric.remove(*values)
                removed += 1
        return removed

    def render(self) -> bytes:
        return generate_latest(self.registry)
