"""Tenants: who is calling (a key, compared in constant time), may they use this model, and are
they within their requests-per-minute and tokens-per-minute budgets.

Each limit is a token bucket holding up to one minute's budget and refilling at budget/60 per
second, so over any 60 s window a tenant gets at most the budget plus what one bucket holds
(plus, for tokens, the size of one request: its tokens are known only when it finishes, so the
bucket may go below zero and the tenant waits until it is back at zero).
"""

import hashlib
import hmac
import math
import time
from dataclasses import dataclass, field

from kvpilot.serving.router.config import RouterConfig, Tenant, tenant_key_hashes


@dataclass
class TokenBucket:
    capacity: float
    refill_per_second: float
    level: float = field(default=-1.0)
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.capacity

    @classmethod
    def per_minute(cls, budget: int, now: float) -> "TokenBucket":
        return cls(capacity=float(budget), refill_per_second=budget / 60.0, updated=now)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.refill_per_second)
        self.updated = now

    def retry_after(self, needed: float, now: float) -> float:
        """Seconds until the bucket holds `needed` (0 when it does now)."""
        self.refill(now)
        missing = needed - self.level
        return missing / self.refill_per_second if missing > 1e-9 else 0.0  # 1e-9: float dust

    def take(self, amount: float, now: float) -> None:
        """Spend `amount`; the level may go below zero (tokens counted after the fact)."""
        self.refill(now)
        self.level -= amount


class RateLimited(Exception):
    def __init__(self, limit: str, retry_after: float):
        super().__init__(limit)
        self.limit = limit  # "requests" or "tokens"
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


@dataclass
class TenantState:
    tenant: Tenant
    requests: TokenBucket | None
    tokens: TokenBucket | None

    def may_use(self, model: str) -> bool:
        return self.tenant.models is None or model in self.tenant.models

    def admit(self, now: float | None = None) -> None:
        """Count one request, or raise RateLimited (nothing is spent then)."""
        now = time.monotonic() if now is None else now
        if self.tokens is not None and (wait := self.tokens.retry_after(0.0, now)) > 0:
            raise RateLimited("tokens", wait)
        if self.requests is not None:
            if (wait := self.requests.retry_after(1.0, now)) > 0:
                raise RateLimited("requests", wait)
            self.requests.take(1.0, now)

    def spend_tokens(self, count: int, now: float | None = None) -> None:
        if self.tokens is not None:
            self.tokens.take(count, time.monotonic() if now is None else now)


class Tenants:
    """The tenants of one config: keys as sha256 digests only, buckets per tenant name."""

    def __init__(self, config: RouterConfig, previous: "Tenants | None" = None, now: float | None = None):
        now = time.monotonic() if now is None else now
        self.enabled = config.tenants is not None
        self.digests = tenant_key_hashes(config)  # {digest: tenant name}
        self.states: dict[str, TenantState] = {}
        for tenant in config.tenants or ():
            old = previous.states.get(tenant.name) if previous is not None else None
            self.states[tenant.name] = TenantState(
                tenant,
                _bucket(tenant.requests_per_minute, old.requests if old else None, now),
                _bucket(tenant.tokens_per_minute, old.tokens if old else None, now),
            )

    def authenticate(self, authorization: str | None) -> TenantState | None:
        """The tenant whose key is in `Authorization: Bearer KEY`, or None. Every digest is
        compared (in constant time), so timing says nothing about which tenant nearly matched."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hashlib.sha256(key.strip().encode()).hexdigest().encode()
        found = None
        for known, name in self.digests.items():
            if hmac.compare_digest(digest, known.encode()):
                found = name
        return self.states[found] if found is not None else None


def _bucket(budget: int | None, old: TokenBucket | None, now: float) -> TokenBucket | None:
    """A bucket for a budget; a reload with the same budget keeps the old bucket's level."""
    if budget is None:
        return None
    if old is not None and old.capacity == budget:
        return old
    return TokenBucket.per_minute(budget, now)
