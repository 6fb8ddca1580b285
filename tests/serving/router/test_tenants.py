"""Tenant keys and the token buckets, with explicit clocks."""

import asyncio
import hashlib

import pytest
from kvpilot.serving.router.activation import ActivationQueue, QueueFull
from kvpilot.serving.router.config import parse_config
from kvpilot.serving.router.tenants import RateLimited, Tenants, TokenBucket

CONFIG = """
models:
- name: m
  revisions: [{name: r}]
tenants:
- {name: rpm, keySha256: %s, requestsPerMinute: 3}
- {name: tpm, keyFile: %s, tokensPerMinute: 600, models: [m]}
"""


@pytest.fixture
def tenants(tmp_path):
    (tmp_path / "key").write_text("tpm-key\n")
    config = parse_config(CONFIG % (hashlib.sha256(b"rpm-key").hexdigest(), tmp_path / "key"))
    return Tenants(config, now=0.0)


def test_keys_find_their_tenant(tenants):
    assert tenants.authenticate("Bearer rpm-key").tenant.name == "rpm"
    assert tenants.authenticate("bearer tpm-key").tenant.name == "tpm"
    for header in (None, "", "Bearer", "Bearer wrong", "Basic rpm-key", "rpm-key"):
        assert tenants.authenticate(header) is None
    assert tenants.states["tpm"].may_use("m") and not tenants.states["tpm"].may_use("other")
    assert tenants.states["rpm"].may_use("anything")


def test_requests_per_minute_bucket(tenants):
    state = tenants.states["rpm"]
    for _ in range(3):
        state.admit(now=0.0)
    with pytest.raises(RateLimited) as limited:
        state.admit(now=0.0)
    assert (limited.value.limit, limited.value.retry_after, limited.value.retry_after_header) == (
        "requests",
        20,
        "20",
    )
    with pytest.raises(RateLimited) as limited:
        state.admit(now=5.0)
    assert limited.value.retry_after == pytest.approx(15)
    state.admit(now=20.0)  # one request's worth refilled (3 per 60 s)
    with pytest.raises(RateLimited):
        state.admit(now=20.0)


def test_tokens_per_minute_bucket_counts_usage_after_the_fact(tenants):
    state = tenants.states["tpm"]  # 600 per minute: 10 per second
    state.admit(now=0.0)
    state.spend_tokens(750, now=0.0)  # one big request takes the bucket to -150
    with pytest.raises(RateLimited) as limited:
        state.admit(now=10.0)  # refilled 100: still -50
    assert (limited.value.limit, limited.value.retry_after) == ("tokens", pytest.approx(5.0))
    assert limited.value.retry_after_header == "5"
    with pytest.raises(RateLimited):
        state.admit(now=14.9)
    state.admit(now=15.0)
    assert state.tokens.level == pytest.approx(0.0)


def test_a_bucket_over_any_window_allows_at_most_the_budget_plus_its_capacity():
    bucket = TokenBucket.per_minute(60, now=0.0)
    admitted = 0
    for tenth in range(1200):  # 120 s of a client asking 10 times a second
        now = tenth / 10
        if bucket.retry_after(1, now) == 0:
            bucket.take(1, now)
            admitted += 1
    assert admitted == pytest.approx(60 + 120, abs=1)


def test_a_reload_keeps_the_buckets_of_unchanged_budgets(tenants, tmp_path):
    tenants.states["rpm"].admit(now=0.0)
    config = parse_config(CONFIG % (hashlib.sha256(b"rpm-key").hexdigest(), tmp_path / "key"))
    again = Tenants(config, previous=tenants, now=0.0)
    assert again.states["rpm"].requests.level == 2
    changed = parse_config(
        (CONFIG % (hashlib.sha256(b"rpm-key").hexdigest(), tmp_path / "key")).replace("3}", "5}")
    )
    assert Tenants(changed, previous=tenants, now=0.0).states["rpm"].requests.level == 5


def test_activation_queue_is_bounded_fifo_and_times_out():
    async def scenario():
        queue = ActivationQueue()
        order: list[int] = []

        async def held(i: int) -> None:
            if await queue.wait("m", timeout=30, max_queued=3):
                order.append(i)

        tasks = []
        for i in range(3):
            tasks.append(asyncio.create_task(held(i)))
            await asyncio.sleep(0)
        assert queue.held("m") == 3
        with pytest.raises(QueueFull):
            await queue.wait("m", timeout=30, max_queued=3)
        queue.release("m")
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2] and queue.held("m") == 0
        assert await queue.wait("m", timeout=0.05, max_queued=3) is False
        assert queue.held("m") == 0

    asyncio.run(scenario())


def test_activation_queue_bounds_the_bytes_it_holds_over_all_models():
    """100 held 4 MiB bodies took a router to 548 MB, past its 512Mi limit: the bodies held count."""

    async def scenario():
        queue = ActivationQueue(max_bytes=10)
        first = asyncio.create_task(queue.wait("a", timeout=30, max_queued=100, size=6))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="hold 6 of the router's 10 bytes"):
            await queue.wait("b", timeout=30, max_queued=100, size=5)  # another model: the same bytes
        assert await queue.wait("b", timeout=0.01, max_queued=100, size=4) is False  # fits: held, timed out
        assert queue.bytes_held == 6
        queue.release("a")
        assert await first is True and queue.bytes_held == 0

    asyncio.run(scenario())
