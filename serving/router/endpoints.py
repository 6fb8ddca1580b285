"""One upstream server as the router sees it: in-flight count, health, and its scraped load.

Health has two inputs: the active probe (`/ready` polled, `ready`) and passive ejection (a
connection failure or a 5xx before the first byte ejects the endpoint for a cool-down that
doubles with each consecutive failure, up to a cap; a success resets it). Failures reported while
the endpoint is already ejected do not count again: one crash breaks every request it was
serving at once, and that is one failure, not ten.

An endpoint whose `/ready` got no HTTP answer at all LOST_AFTER_FAILED_PROBES times in a row
(timeouts, refused connections: the process is frozen or its node is gone) is lost (the event
`lost` is set, so no request polls for it): the requests still waiting on it are given up (a
TCP connection to a vanished node can stay open for hours). A server that answers, even 503
while it drains, is never lost.
"""

import asyncio
import time
from dataclasses import dataclass, field

EJECT_BASE_SECONDS = 1.0
EJECT_MAX_SECONDS = 60.0
LOST_AFTER_FAILED_PROBES = 5


@dataclass
class Endpoint:
    url: str
    ready: bool = False  # the last /ready probe answered 200
    in_flight: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0  # time.monotonic() before which the endpoint gets no request
    num_requests_waiting: float = 0.0  # scraped vllm:num_requests_waiting
    kv_cache_usage: float = 0.0  # scraped vllm:kv_cache_usage_perc
    failed_probes: int = 0  # consecutive /ready probes without any HTTP answer
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set while it is lost

    def probe_answered(self) -> None:
        self.failed_probes = 0
        self.lost.clear()

    def probe_unanswered(self) -> None:
        self.failed_probes += 1
        if self.failed_probes >= LOST_AFTER_FAILED_PROBES:
            self.lost.set()

    def is_available(self, now: float | None = None) -> bool:
        return self.ready and (time.monotonic() if now is None else now) >= self.ejected_until

    def eject(self, now: float | None = None) -> float:
        """A failure: out for EJECT_BASE_SECONDS * 2^(failures-1), capped; returns the seconds it
        stays out (what is left of the current ejection, when it is already out)."""
        now = time.monotonic() if now is None else now
        if now < self.ejected_until:
            return self.ejected_until - now
        self.consecutive_failures += 1
        cool_down = min(EJECT_BASE_SECONDS * 2 ** (self.consecutive_failures - 1), EJECT_MAX_SECONDS)
        self.ejected_until = now + cool_down
        return cool_down

    def succeed(self) -> None:
        self.consecutive_failures = 0
        self.ejected_until = 0.0


@dataclass
class EndpointRegistry:
    """Endpoints by URL, kept across config reloads so a reload keeps their state (in-flight
    counts of running requests, ejections)."""

    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    def get(self, url: str) -> Endpoint:
        if url not in self.endpoints:
            self.endpoints[url] = Endpoint(url)
        return self.endpoints[url]

    def retain(self, urls: set[str]) -> None:
        """Forget endpoints no longer configured once nothing runs on them: until then they are
        still probed, so that a request on one that is lost is given up."""
        for url in set(self.endpoints) - urls:
            if not self.endpoints[url].in_flight:
                del self.endpoints[url]
