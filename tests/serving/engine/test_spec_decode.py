"""Speculative decoding without a model: n-gram proposals, draft verification (exact for greedy,
distribution-preserving for sampling: chi-square on a small vocabulary), and the scheduler's
budget, KV slots, prefix-cache hashing and stop rules with drafts."""

import random

import pytest
import torch
from kvpilot.serving.engine.ngram_proposer import NgramProposer, propose_from
from kvpilot.serving.engine.request import Request
from kvpilot.serving.engine.sampler import Sampler
from kvpilot.serving.engine.spec_decode import RejectionSampler
from kvpilot.serving.sampling_params import SamplingParams

from tests.serving.engine.test_scheduler import EOS, add, make_scheduler


@pytest.mark.parametrize(
    ("token_ids", "n", "k", "proposal"),
    [
        ([1, 2, 3, 4, 1, 2], 2, 3, [3, 4, 1]),
        ([1, 2, 5, 1, 2, 6, 1, 2], 2, 3, [6, 1, 2]),  # the latest earlier occurrence
        ([1, 2, 3, 4, 1, 2], 3, 3, []),  # (4, 1, 2) never occurred before
        ([1, 2, 3, 9, 2], 1, 2, [3, 9]),
        ([7, 7, 7], 2, 3, [7, 7, 7]),  # the copy runs on through its own proposal
        ([1, 2, 3, 1, 2, 3, 1], 1, 5, [2, 3, 1, 2, 3]),
        ([5, 5], 2, 3, []),  # no n-gram before the suffix
        ([1, 2, 3, 4, 1, 2], 2, 1, [3]),
    ],
)
def test_ngram_proposals(token_ids, n, k, proposal):
    assert propose_from(token_ids, n, k) == proposal


def test_the_incremental_index_proposes_what_a_fresh_scan_does():
    rng = random.Random(0)
    request = Request("r", [rng.randrange(6) for _ in range(20)], SamplingParams(), 200)
    proposer = NgramProposer(n=2, num_speculative_tokens=4)
    for _ in range(150):
        assert proposer.propose(request) == propose_from(request.all_token_ids, 2, 4)
        request.output_token_ids += [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
    assert proposer.propose(request, max_tokens=2) == propose_from(request.all_token_ids, 2, 2)
    assert proposer.propose(request, max_tokens=0) == []


# Verification

VOCAB = 6


def chi_square_p_value(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    statistic = sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True) if p > 0)
    dof = sum(p > 0 for p in probs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(statistic / 2)))


def sampled_requests(count: int, **params) -> list[Request]:
    params = SamplingParams(temperature=1.0, max_tokens=50, **params)
    return [Request(f"r{i}", [0, 1], params, 50) for i in range(count)]


def test_rejection_sampling_preserves_the_target_distribution():
    # Row 0 predicts the first new token, row 1 the next one after draft 0, row 2 after both.
    rows = torch.tensor([[1.0, 0.2, -0.5, 0.6, 0.0, -1.0], [0.1, 1.2, 0.3, -0.2, 0.5, 0.0], [0.0] * VOCAB])
    probs = torch.softmax(rows, dim=-1)
    drafts = [3, 1]  # p(3) = 0.21 in row 0, p(1) = 0.31 in row 1: both often rejected
    trials = 6000
    sampler = RejectionSampler(Sampler({EOS}, torch.Generator().manual_seed(0)))
    requests = sampled_requests(trials)
    output = sampler(rows.repeat(trials, 1), requests, [drafts] * trials)
    first = [tokens[0] for tokens in output.token_ids]
    second = [tokens[1] for tokens in output.token_ids if len(tokens) > 1]
    assert all(len(t) == 1 or t[0] == drafts[0] for t in output.token_ids)
    assert chi_square_p_value([first.count(t) for t in range(VOCAB)], probs[0].tolist()) > 1e-3
    assert chi_square_p_value([second.count(t) for t in range(VOCAB)], probs[1].tolist()) > 1e-3
    # A wrong residual (resampling from p itself) would give the draft 0.21 + 0.79 * 0.21 = 0.38:
    assert abs(first.count(drafts[0]) / trials - probs[0, drafts[0]].item()) < 0.03


def test_drafts_outside_top_k_are_always_rejected_and_the_residual_keeps_top_k():
    rows = torch.tensor([[2.0, 1.5, 0.0, -1.0, -2.0, -3.0], [0.0] * VOCAB])
    sampler = RejectionSampler(Sampler({EOS}, torch.Generator().manual_seed(1)))
    output = sampler(rows.repeat(400, 1), sampled_requests(400, top_k=2), [[4]] * 400)
    assert {len(t) for t in output.token_ids} == {1}
    assert {t[0] for t in output.token_ids} == {0, 1}


def test_greedy_verification_accepts_the_matching_prefix_and_appends_the_argmax():
    rows = torch.full((4, VOCAB), -1.0)
    for row, token in enumerate([3, 5, 0, 4]):
        rows[row, token] = 1.0
    sampler = RejectionSampler(Sampler({EOS}, torch.Generator()))
    greedy = SamplingParams(temperature=0.0, max_tokens=9, logprobs=1)
    request = Request("g", [0, 1], greedy, 9)
    output = sampler(rows, [request], [[3, 5, 1]])
    assert output.token_ids == [[3, 5, 0]]  # draft 1 rejected at row 2, whose argmax is 0
    (entries,) = output.logprobs
    log_z = torch.logsumexp(rows[0], dim=0).item()
    assert [list(e) for e in entries] == [[3], [5], [0]]
    assert entries[0][3] == pytest.approx(1.0 - log_z)


def test_seeded_requests_verify_reproducibly():
    rows = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))

    def run(seed: int) -> list[list[int]]:
        sampler = RejectionSampler(Sampler({EOS}, torch.Generator().manual_seed(seed)))  # engine seed varies
        requests = [
            Request(
                f"s{i}",
                [0],
                SamplingParams(seed=7, max_tokens=9),
                9,
                generator=torch.Generator().manual_seed(7 + i),
            )
            for i in range(20)
        ]
        return sampler(rows.repeat(20, 1), requests, [[1, 2]] * 20).token_ids

    assert run(0) == run(1)


# The scheduler with drafts (block_size 4)


def decode_with_drafts(scheduler, request, drafts):
    request.spec_token_ids = drafts
    return scheduler.schedule()


def test_a_draft_step_schedules_and_rolls_back_exactly():
    s = make_scheduler(budget=16)
    request = add(s, "r", 4, token_ids=[10, 11, 12, 13])
    s.update_from_output(s.schedule(), [[20]])  # prefill; output [20]
    manager = s.kv_cache_manager
    assert manager.get_block_ids("r") == [0] and manager.block_pool.num_free_blocks == 63
    output = decode_with_drafts(s, request, [21, 22, 23, 24])
    (chunk,) = output.chunks
    assert (chunk.token_ids, chunk.num_computed_tokens, chunk.spec_token_ids) == (
        [20, 21, 22, 23, 24],
        4,
        [21, 22, 23, 24],
    )
    assert output.num_batched_tokens == 5 and request.num_computed_tokens == 9
    assert manager.get_block_ids("r") == [0, 1, 2]  # positions 4..8
    # Block 1 (positions 4..7) is full but holds drafts: not cached yet.
    assert manager.block_pool.blocks[1].block_hash is None
    s.update_from_output(output, [[21, 30]])  # draft 21 accepted, 22 rejected, 30 sampled
    assert request.output_token_ids == [20, 21, 30] and request.num_computed_tokens == 6
    assert manager.get_block_ids("r") == [0, 1] and manager.block_pool.num_free_blocks == 62
    assert (s.num_draft_tokens, s.num_accepted_tokens, s.generation_tokens) == (4, 1, 3)
    # Next step: positions 6, 7 are real tokens + drafts; block 1 is cached once tokens fill it.
    output = decode_with_drafts(s, request, [31, 32])
    assert output.chunks[0].token_ids == [30, 31, 32] and output.chunks[0].num_computed_tokens == 6
    assert manager.block_pool.blocks[1].block_hash is None
    s.update_from_output(output, [[31, 32, 33]])  # all accepted + one sampled
    assert request.num_computed_tokens == 9 and request.output_token_ids == [20, 21, 30, 31, 32, 33]
    decode_with_drafts(s, request, [])
    assert manager.block_pool.blocks[1].block_hash is not None


def test_the_budget_truncates_drafts_and_prefills_share_it():
    s = make_scheduler(budget=6)
    a = add(s, "a", 2)
    s.update_from_output(s.schedule(), [[50]])
    add(s, "b", 9)
    output = decode_with_drafts(s, a, [51, 52, 53, 54, 55, 56])
    assert [(c.request_id, len(c.token_ids), c.spec_token_ids) for c in output.chunks] == [
        ("a", 6, [51, 52, 53, 54, 55]),
    ]
    s.update_from_output(output, [[51, 52, 9]])
    a.spec_token_ids = [60]
    output = s.schedule()
    assert [(c.request_id, len(c.token_ids)) for c in output.chunks] == [("a", 2), ("b", 4)]


@pytest.mark.parametrize(
    ("params", "accepted", "output", "finish_reason"),
    [
        (dict(), [5, EOS, 6, 7], [5, EOS], "stop"),  # EOS inside the accepted drafts
        (dict(min_tokens=3), [EOS, 5, EOS, 6], [EOS, 5, EOS], "stop"),
        (dict(stop_token_ids=(6,)), [5, 6, 7], [5, 6], "stop"),
        (dict(), [5, 6, 7, 8, 9, 10], [5, 6, 7, 8], "length"),  # max_tokens 4 (drafts were not capped)
    ],
)
def test_stop_rules_hold_inside_accepted_drafts(params, accepted, output, finish_reason):
    s = make_scheduler()
    request = add(s, "r", 3, max_tokens=4, **params)
    s.update_from_output(s.schedule(), [accepted[:1]])  # the prefill samples the first token
    output_step = decode_with_drafts(s, request, accepted[1:-1])
    s.update_from_output(output_step, [accepted[1:]])
    assert request.output_token_ids == output and request.finish_reason == finish_reason
    assert s.kv_cache_manager.block_pool.num_free_blocks == 64


def test_a_stop_string_inside_accepted_drafts_drops_the_tokens_after_it():
    s = make_scheduler()
    request = add(s, "r", 3, max_tokens=20)
    s.update_from_output(s.schedule(), [[5]])
    output = decode_with_drafts(s, request, [6, 7, 8])
    s.update_from_output(
        output, [[6, 7, 8, 9]], check_stop_string=lambda r: "x" if r.output_token_ids[-1] == 7 else None
    )
    assert request.output_token_ids == [5, 6, 7] and (request.finish_reason, request.stop_reason) == (
        "stop",
        "x",
    )
