"""Scheduler state machine, no model: exact chunks per step, preemption order, prefix hits, stops."""

import pytest
from kvpilot.serving.engine.kv_cache_manager import KVCacheManager
from kvpilot.serving.engine.request import Request, RequestStatus
from kvpilot.serving.engine.scheduler import Scheduler
from kvpilot.serving.sampling_params import SamplingParams

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, max_model_len=64, caching=True):
    manager = KVCacheManager(num_blocks, block_size, enable_caching=caching)
    return Scheduler(manager, max_num_seqs, budget, max_model_len, eos_token_ids={EOS})


def add(scheduler, request_id, num_prompt_tokens=0, max_tokens=8, token_ids=None, **params):
    token_ids = (
        token_ids
        if token_ids is not None
        else [100 + len(scheduler.requests) * 50 + i for i in range(num_prompt_tokens)]
    )
    request = Request(
        request_id, list(token_ids), SamplingParams(max_tokens=max_tokens, **params), max_tokens
    )
    scheduler.add_request(request)
    return request


def step(scheduler, token=7):
    """One engine step with the model replaced by a constant sampled token; returns the chunks as
    (request_id, num_tokens, num_computed_tokens, sample)."""
    output = scheduler.schedule()
    scheduler.update_from_output(output, [[token]] * sum(c.sample for c in output.chunks))
    return [(c.request_id, len(c.token_ids), c.num_computed_tokens, c.sample) for c in output.chunks]


def all_blocks_free(scheduler):
    pool = scheduler.kv_cache_manager.block_pool
    return pool.num_free_blocks == pool.num_blocks and all(b.ref_cnt == 0 for b in pool.blocks)


def test_budget_is_shared_running_first_and_long_prompts_are_chunked():
    s = make_scheduler(budget=12)
    add(s, "a", 10)
    add(s, "b", 6)
    add(s, "c", 4)
    assert step(s) == [("a", 10, 0, True), ("b", 2, 0, False)]
    assert step(s) == [("a", 1, 10, True), ("b", 4, 2, True), ("c", 4, 0, True)]
    assert step(s) == [("a", 1, 11, True), ("b", 1, 6, True), ("c", 1, 4, True)]
    assert s.prompt_tokens == 20 and s.generation_tokens == 7


def test_chunk_carries_positions_tokens_and_block_table():
    s = make_scheduler(budget=6)
    a = add(s, "a", 9)
    first = s.schedule()
    (chunk,) = first.chunks
    assert chunk.token_ids == a.prompt_token_ids[:6] and chunk.block_table == [0, 1] and not chunk.sample
    assert first.num_batched_tokens == 6
    s.update_from_output(first, [])
    (chunk,) = s.schedule().chunks
    assert chunk.token_ids == a.prompt_token_ids[6:] and chunk.num_computed_tokens == 6
    assert chunk.block_table == [0, 1, 2] and chunk.sample


def test_max_num_seqs_caps_the_batch_and_requests_join_when_others_leave():
    s = make_scheduler(max_num_seqs=2, budget=100)
    add(s, "a", 3, max_tokens=1)
    add(s, "b", 3, max_tokens=2)
    add(s, "c", 3, max_tokens=1)
    assert step(s) == [("a", 3, 0, True), ("b", 3, 0, True)]  # a finishes (max_tokens=1)
    assert step(s) == [("b", 1, 3, True), ("c", 3, 0, True)]  # c joins as a leaves
    assert not s.has_unfinished_requests() and all_blocks_free(s)


def test_pool_exhaustion_preempts_the_latest_arrival_which_recomputes_later():
    # 4 blocks of 4 tokens; a and b each hold 2 blocks after their 6-token prompts.
    s = make_scheduler(num_blocks=4, budget=100, caching=False)
    a = add(s, "a", 6, max_tokens=6)
    b = add(s, "b", 6, max_tokens=6)
    assert step(s) == [("a", 6, 0, True), ("b", 6, 0, True)]
    assert step(s) == [("a", 1, 6, True), ("b", 1, 6, True)]
    assert step(s) == [("a", 1, 7, True), ("b", 1, 7, True)]  # 8 computed each: pool full
    # a's 9th token needs a third block: b, the latest arrival, is preempted to make room.
    assert step(s) == [("a", 1, 8, True)]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert list(s.waiting) == [b] and s.num_preemptions == 1
    assert b.output_token_ids == [7, 7, 7]  # kept: b recomputes prompt + outputs later
    while s.has_unfinished_requests():
        step(s)
    assert a.finish_reason == b.finish_reason == "length"
    assert a.num_output_tokens == b.num_output_tokens == 6
    assert all_blocks_free(s)


def test_a_request_preempts_itself_when_it_is_the_latest():
    s = make_scheduler(num_blocks=3, budget=100, caching=False)
    add(s, "a", 4, max_tokens=5)
    b = add(s, "b", 4, max_tokens=5)
    assert step(s) == [("a", 4, 0, True), ("b", 4, 0, True)]  # one block each
    # Both need a second block for their 5th token; a takes the last free one, b yields.
    assert step(s) == [("a", 1, 4, True)]
    assert b.status is RequestStatus.PREEMPTED and s.num_preemptions == 1
    assert s.kv_cache_manager.get_block_ids("b") == []


def test_prefix_hits_are_counted_and_skip_computation():
    s = make_scheduler(budget=100)
    shared = list(range(500, 512))  # 3 full blocks
    a = add(s, "a", token_ids=[*shared, 1, 2], max_tokens=1)
    step(s)
    assert a.finish_reason == "length"
    b = add(s, "b", token_ids=[*shared, 3], max_tokens=1)
    assert step(s) == [("b", 1, 12, True)]
    assert b.num_cached_tokens == 12
    assert s.prefix_cache_queries == 14 + 13 and s.prefix_cache_hits == 12
    add(s, "c", token_ids=shared, max_tokens=1)  # whole prompt cached: last block recomputed
    assert step(s) == [("c", 4, 8, True)]
    assert all_blocks_free(s)


def test_requests_sharing_a_prefix_in_one_step_hit_blocks_scheduled_that_step():
    s = make_scheduler(budget=100)
    shared = list(range(300, 308))
    add(s, "a", token_ids=[*shared, 1], max_tokens=1)
    add(s, "b", token_ids=[*shared, 2], max_tokens=1)
    assert step(s) == [("a", 9, 0, True), ("b", 1, 8, True)]


@pytest.mark.parametrize(
    ("params", "tokens", "finish_reason", "stop_reason", "num_outputs"),
    [
        (dict(), [5, EOS, 5], "stop", None, 2),
        (dict(ignore_eos=True), [5, EOS, 5], "length", None, 3),
        (dict(stop_token_ids=(9,)), [5, 9, 5], "stop", 9, 2),
        (dict(min_tokens=3), [EOS, EOS, EOS, EOS], "stop", None, 3),
        (dict(min_tokens=2, stop_token_ids=(9,)), [9, 9, 9], "stop", 9, 2),
        (dict(), [5, 5, 5], "length", None, 3),
    ],
)
def test_stop_rules(params, tokens, finish_reason, stop_reason, num_outputs):
    s = make_scheduler()
    request = add(s, "r", 3, max_tokens=3, **params)
    for token in tokens:
        if request.is_finished:
            break
        step(s, token)
    assert (request.finish_reason, request.stop_reason, request.num_output_tokens) == (
        finish_reason,
        stop_reason,
        num_outputs,
    )
    assert all_blocks_free(s)


def test_max_model_len_ends_a_request():
    s = make_scheduler(max_model_len=6)
    request = add(s, "r", 4, max_tokens=10)
    step(s)
    step(s)
    assert request.finish_reason == "length" and request.num_tokens == 6


def test_finishing_a_waiting_or_running_request_frees_everything():
    s = make_scheduler(max_num_seqs=1)
    running = add(s, "a", 5)
    waiting = add(s, "b", 5)
    step(s)
    s.finish_request(waiting, "abort")
    s.finish_request(running, "abort")
    assert not s.has_unfinished_requests() and all_blocks_free(s)
    assert running.finish_reason == waiting.finish_reason == "abort"
