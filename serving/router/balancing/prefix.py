"""`prefix`: consistent hashing with bounded loads (Mirrokni et al.; KubeAI's PrefixHash).

Each endpoint owns VIRTUAL_NODES points on a hash ring. A request's prefix key hashes to a point;
walking clockwise, the first endpoint whose in-flight count stays within
`ceil(LOAD_FACTOR * (total in flight + 1) / number of endpoints)` takes it. Requests sharing a
prefix so land on the same engine (and its prefix cache) until it is over its bounded load, and
adding or removing an endpoint moves only the keys next to its points.
"""

import bisect
import hashlib
import math

from kvpilot.serving.router.endpoints import Endpoint

VIRTUAL_NODES = 100
LOAD_FACTOR = 1.25


def ring_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, urls: list[str], virtual_nodes: int = VIRTUAL_NODES):
        points = sorted((ring_hash(f"{url}#{i}"), url) for url in set(urls) for i in range(virtual_nodes))
        self.hashes = [point for point, _ in points]
        self.urls = [url for _, url in points]

    def walk(self, key: str) -> list[str]:
        """Every URL once, in ring order starting at the key's point."""
        start = bisect.bisect(self.hashes, ring_hash(key))
        seen: dict[str, None] = {}
        for i in range(len(self.urls)):
            seen.setdefault(self.urls[(start + i) % len(self.urls)])
        return list(seen)


def load_bound(total_in_flight: int, num_endpoints: int, load_factor: float = LOAD_FACTOR) -> int:
    """The most in-flight requests an endpoint may have after taking one more."""
    return math.ceil(load_factor * (total_in_flight + 1) / num_endpoints)


class PrefixHash:
    def __init__(self, load_factor: float = LOAD_FACTOR):
        self.load_factor = load_factor
        self._ring: HashRing | None = None
        self._ring_urls: frozenset[str] = frozenset()

    def pick(self, endpoints: list[Endpoint], key: str) -> Endpoint | None:
        if not endpoints:
            return None
        by_url = {endpoint.url: endpoint for endpoint in endpoints}
        if self._ring is None or self._ring_urls != frozenset(by_url):
            self._ring, self._ring_urls = HashRing(list(by_url)), frozenset(by_url)
        bound = load_bound(sum(e.in_flight for e in endpoints), len(endpoints), self.load_factor)
        order = self._ring.walk(key)
        for url in order:
            if by_url[url].in_flight + 1 <= bound:
                return by_url[url]
        return by_url[order[0]]  # unreachable while load_factor >= 1: someone is at or below the mean
