"""The router's /metrics (prometheus-client, its own registry). Tenants appear by name only,
never by key."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
NO_TENANT = ""  # the tenant label when the config has no tenants


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
        self.queued = Gauge(
            "kvpilot_router_queued_requests",
            "Requests held while the model has no ready endpoint",
            ["model"],
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
