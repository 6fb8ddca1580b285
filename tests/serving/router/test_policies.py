"""The pure decisions: revision weights, the hash ring with bounded loads, least-request, ejection."""

from collections import Counter

import pytest
from kvpilot.serving.router.balancing import PREFIX_WINDOW_CHARS, make_balancer, prefix_key
from kvpilot.serving.router.balancing.least_request import LeastRequest
from kvpilot.serving.router.balancing.prefix import HashRing, PrefixHash, load_bound
from kvpilot.serving.router.endpoints import EJECT_MAX_SECONDS, Endpoint
from kvpilot.serving.router.health import scraped_load
from kvpilot.serving.router.weights import WeightedRoundRobin


@pytest.mark.parametrize(
    "weights",
    [[("stable", 90), ("canary", 10)], [("a", 50), ("b", 50)], [("a", 70), ("b", 20), ("c", 10)], [("a", 1)]],
)
def test_the_split_over_1000_picks_is_within_3_points_of_the_weights(weights):
    picker = WeightedRoundRobin()
    picks = Counter(picker.pick(weights) for _ in range(1000))
    total = sum(weight for _, weight in weights)
    for name, weight in weights:
        assert abs(picks[name] / 10 - 100 * weight / total) <= 3, (name, picks)


def test_picks_interleave_and_a_revision_leaving_gives_its_share_to_the_others():
    picker = WeightedRoundRobin()
    assert [picker.pick([("stable", 90), ("canary", 10)]) for _ in range(10)].count("canary") == 1
    picker = WeightedRoundRobin()
    assert [picker.pick([("a", 2), ("b", 1)]) for _ in range(6)] == ["a", "b", "a", "a", "b", "a"]
    assert {picker.pick([("b", 1), ("c", 3)]) for _ in range(8)} == {"b", "c"}  # a went unhealthy


def test_weight_zero_drains_and_all_zero_picks_nothing():
    picker = WeightedRoundRobin()
    assert {picker.pick([("old", 0), ("new", 5)]) for _ in range(200)} == {"new"}
    assert picker.pick([("old", 0), ("new", 0)]) is None
    assert picker.pick([]) is None


def endpoints(*loads: int) -> list[Endpoint]:
    return [Endpoint(f"http://10.0.0.{i}:8000", ready=True, in_flight=load) for i, load in enumerate(loads)]


def test_the_ring_is_consistent_and_removing_an_endpoint_moves_only_its_keys():
    urls = [f"http://10.0.0.{i}:8000" for i in range(4)]
    full, without = HashRing(urls), HashRing(urls[:3])
    keys = [f"system prompt {i}" for i in range(400)]
    owners = {key: full.walk(key)[0] for key in keys}
    assert owners == {key: HashRing(list(reversed(urls))).walk(key)[0] for key in keys}  # order-free
    assert set(Counter(owners.values())) == set(urls)  # every endpoint owns some keys
    for key in keys:
        if owners[key] != urls[3]:
            assert without.walk(key)[0] == owners[key]
    assert sorted(full.walk("x")) == sorted(urls)


@pytest.mark.parametrize(
    "total, n, bound", [(0, 2, 1), (1, 2, 2), (2, 2, 2), (3, 2, 3), (9, 3, 5), (0, 1, 2), (99, 4, 32)]
)
def test_load_bound_is_ceil_of_factor_times_mean_after_the_request(total, n, bound):
    assert load_bound(total, n) == bound


def test_prefix_sticks_to_one_endpoint_until_it_is_over_its_bounded_load():
    pool = endpoints(0, 0)
    policy = PrefixHash()
    home = policy.pick(pool, "the shared system prompt")
    other = next(e for e in pool if e is not home)
    assert all(policy.pick(pool, "the shared system prompt") is home for _ in range(5))
    picks = []
    for _ in range(4):  # requests that stay in flight: home 0->1->2, then the bound (2) sends one over
        chosen = policy.pick(pool, "the shared system prompt")
        chosen.in_flight += 1
        picks.append(chosen)
    assert picks == [home, home, other, home]
    assert (home.in_flight, other.in_flight) == (3, 1)


def test_prefix_spreads_different_prefixes():
    pool = endpoints(0, 0, 0)
    policy = PrefixHash()
    chosen = Counter(policy.pick(pool, f"prompt family {i}").url for i in range(300))
    assert len(chosen) == 3 and min(chosen.values()) > 40


def test_least_request_breaks_ties_by_waiting_then_kv_usage():
    a, b, c = endpoints(2, 1, 1)
    b.num_requests_waiting, c.num_requests_waiting = 3, 0
    assert LeastRequest().pick([a, b, c], "") is c
    c.num_requests_waiting, b.kv_cache_usage, c.kv_cache_usage = 3, 0.2, 0.5
    assert LeastRequest().pick([a, b, c], "") is b
    assert LeastRequest().pick([], "") is None


METRICS_PAGE = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 2.0
vllm:num_requests_waiting{model_name="b"} 1.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 40.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="a"} 0.25
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="a"} 7.0
vllm:e2e_request_latency_seconds_count{model_name="a"} 7.0
"""


def test_scraped_load_sums_the_two_gauges_and_nothing_else():
    assert scraped_load(METRICS_PAGE) == (3.0, 0.25)
    assert scraped_load("") == (0.0, 0.0)


def test_make_balancer_and_random_pick():
    pool = endpoints(0, 5)
    assert {make_balancer("random").pick(pool, "k").url for _ in range(100)} == {e.url for e in pool}
    assert make_balancer("least-request").pick(pool, "k") is pool[0]
    assert make_balancer("prefix").pick(pool, "k") in pool


def test_prefix_key_renders_chat_messages_and_cuts_the_window():
    chat = {"messages": [{"role": "system", "content": "S" * 1000}, {"role": "user", "content": "q"}]}
    assert prefix_key(chat) == ("system: " + "S" * 1000)[:PREFIX_WINDOW_CHARS]
    short = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    }
    assert prefix_key(short) == 'system: be brief\nuser: [{"text": "hi", "type": "text"}]\n'
    assert prefix_key({"prompt": ["first", "second"]}) == "first"
    assert prefix_key({"prompt": [1, 2, 3]}) == "[1, 2, 3]"


def test_ejection_backs_off_exponentially_up_to_the_cap_and_success_resets():
    endpoint = Endpoint("http://e:1", ready=True)
    now, cool_downs = 100.0, []
    for _ in range(8):  # each failure on the first request after the previous ejection ended
        cool_downs.append(endpoint.eject(now=now))
        now = endpoint.ejected_until
    assert cool_downs == [1, 2, 4, 8, 16, 32, EJECT_MAX_SECONDS, EJECT_MAX_SECONDS]
    assert not endpoint.is_available(now=now - 1)
    assert endpoint.is_available(now=now)
    endpoint.succeed()
    assert endpoint.eject(now=0.0) == 1 and endpoint.is_available(now=1.0)
    assert not Endpoint("http://e:1").is_available(now=1e9)  # not ready until probed


def test_the_requests_one_crash_breaks_together_count_as_one_failure():
    """Ten streams break when their server dies: out for 1 s, not 2^9 s (capped at 60)."""
    endpoint = Endpoint("http://e:1", ready=True)
    left = [endpoint.eject(now=100.0 + i * 0.01) for i in range(10)]
    assert left[0] == 1 and all(0 < seconds < 1 for seconds in left[1:])
    assert endpoint.is_available(now=101.0) and endpoint.consecutive_failures == 1
    assert endpoint.eject(now=101.0) == 2  # the next failure after it came back doubles
