"""`least-request`: the fewest in-flight requests from this router; ties go to the endpoint with
fewer waiting requests, then the lower KV cache usage (both scraped from its /metrics), then at
random."""

import random

from kvpilot.serving.router.endpoints import Endpoint


class LeastRequest:
    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def pick(self, endpoints: list[Endpoint], key: str) -> Endpoint | None:
        if not endpoints:
            return None

        def load(endpoint: Endpoint) -> tuple[int, float, float]:
            return endpoint.in_flight, endpoint.num_requests_waiting, endpoint.kv_cache_usage

        least = min(load(endpoint) for endpoint in endpoints)
        return self.rng.choice([endpoint for endpoint in endpoints if load(endpoint) == least])
