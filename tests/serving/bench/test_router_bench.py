"""`kvpilot bench router`'s pure parts: the shared-prefix workload and the table."""

from kvpilot.serving.bench.router import PolicyResult, format_results
from kvpilot.serving.bench.workload import build_shared_prefix_workload


def test_every_request_is_one_of_the_shared_prefixes_plus_its_own_tokens():
    text = list(range(10_000))
    requests = build_shared_prefix_workload(
        text, num_prompts=40, num_prefixes=3, prefix_len=50, suffix_len=5, output_len=7
    )
    prefixes = {r.prompt_token_ids[:50] for r in requests}
    assert len(prefixes) == 3 and all(r.prompt_len == 55 and r.output_len == 7 for r in requests)
    assert requests == build_shared_prefix_workload(text, 40, 3, 50, 5, 7)  # seeded
    assert requests != build_shared_prefix_workload(text, 40, 3, 50, 5, 7, seed=1)


def test_the_table_shows_hit_rate_and_mean_ttft_per_policy():
    table = format_results(
        [PolicyResult("prefix", 750, 1000, 120.4, 2.5, 0), PolicyResult("random", 250, 1000, 480.0, 1.0, 0)]
    )
    assert table.splitlines()[2:] == [
        "| prefix | 75.0% (750 / 1000 tokens) | 120 | 2.50 |",
        "| random | 25.0% (250 / 1000 tokens) | 480 | 1.00 |",
    ]
