"""Exact block ids, ref counts and free-queue order; no tensors (after vLLM's prefix-caching tests)."""

import pytest
from kvpilot.serving.engine.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock
from kvpilot.serving.engine.kv_cache_manager import KVCacheManager
from kvpilot.serving.engine.request import Request
from kvpilot.serving.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, list(token_ids), SamplingParams(), max_tokens=16)


def refs(manager: KVCacheManager) -> dict[int, int]:
    return {b.block_id: b.ref_cnt for b in manager.block_pool.blocks if b.ref_cnt}


def free_ids(manager: KVCacheManager) -> list[int]:
    return manager.block_pool.free_queue.block_ids()


def cached_ids(manager: KVCacheManager) -> set[int]:
    return {b.block_id for b in manager.block_pool.cached_blocks.values()}


def schedule_prompt(manager: KVCacheManager, request: Request):
    """What the scheduler does for a waiting request: look up hits, allocate, mark computed."""
    hits, num_hit_tokens = manager.get_computed_blocks(request)
    new = manager.allocate_slots(request, request.num_tokens - num_hit_tokens, hits)
    assert new is not None
    request.num_computed_tokens = request.num_tokens
    return [b.block_id for b in hits], [b.block_id for b in new]


def test_free_queue_removes_from_the_middle_in_constant_time():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeKVCacheBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.remove(blocks[0])
    assert queue.block_ids() == [1, 3, 4]
    queue.append(blocks[2])
    assert queue.popleft() is blocks[1]
    assert queue.block_ids() == [3, 4, 2]
    assert queue.num_free_blocks == 3


def test_allocate_free_prefix_hit_and_eviction_order():
    manager = KVCacheManager(num_blocks=10, block_size=BLOCK_SIZE)
    assert free_ids(manager) == list(range(10))

    a = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert schedule_prompt(manager, a) == ([], [0, 1, 2])
    assert refs(manager) == {0: 1, 1: 1, 2: 1}
    assert free_ids(manager) == [3, 4, 5, 6, 7, 8, 9]
    assert cached_ids(manager) == {0, 1}  # only full blocks are cached

    b = make_request("b", [*range(8), 100, 101])  # shares a's two full blocks
    assert schedule_prompt(manager, b) == ([0, 1], [3])
    assert refs(manager) == {0: 2, 1: 2, 2: 1, 3: 1}
    assert manager.get_block_ids("b") == [0, 1, 3]

    manager.free(a)  # tail first: 2 reaches 0; 0 and 1 are still held by b
    assert refs(manager) == {0: 1, 1: 1, 3: 1}
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 2]
    manager.free(b)
    assert refs(manager) == {}
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    assert cached_ids(manager) == {0, 1}  # freed blocks keep their hash until evicted

    c = make_request("c", [*range(8), 7, 7, 7])  # hits 0 and 1 while they sit in the free queue
    assert schedule_prompt(manager, c) == ([0, 1], [4])
    assert free_ids(manager) == [5, 6, 7, 8, 9, 2, 3]
    manager.free(c)
    assert free_ids(manager) == [5, 6, 7, 8, 9, 2, 3, 4, 1, 0]

    d = make_request("d", [1000 + t for t in range(36)])  # 9 blocks: evicts from the head, LRU
    assert schedule_prompt(manager, d) == ([], [5, 6, 7, 8, 9, 2, 3, 4, 1])
    assert free_ids(manager) == [0]
    assert len(manager.block_pool.cached_blocks) == 10  # d's 9 full blocks + block 0 of the old prefix
    manager.free(d)

    e = make_request("e", [*range(8), 5, 5])  # block 1 was evicted: only block 0 hits
    hits, num_hit_tokens = manager.get_computed_blocks(e)
    assert [b.block_id for b in hits] == [0] and num_hit_tokens == 4


def test_the_last_prompt_token_is_always_recomputed():
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    first = make_request("first", list(range(8)))
    schedule_prompt(manager, first)
    manager.free(first)
    again = make_request("again", list(range(8)))  # both blocks cached, yet only one is a hit
    hits, num_hit_tokens = manager.get_computed_blocks(again)
    assert [b.block_id for b in hits] == [0] and num_hit_tokens == 4
    assert schedule_prompt(manager, again) == ([0], [2])  # block 1 is behind 2..5 in the free queue
    assert refs(manager) == {0: 1, 2: 1}


def test_allocate_returns_none_and_changes_nothing_when_short():
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(9)))
    assert manager.allocate_slots(a, 9) is not None
    before = (refs(manager), free_ids(manager))
    b = make_request("b", list(range(100, 105)))
    assert not manager.can_allocate(b, 5)
    assert manager.allocate_slots(b, 5) is None
    assert (refs(manager), free_ids(manager)) == before
    assert manager.get_block_ids("b") == []


def test_hits_on_free_blocks_count_against_capacity():
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(8)))
    schedule_prompt(manager, a)
    manager.free(a)  # blocks 0, 1 cached and free; free queue [2, 1, 0]
    assert free_ids(manager) == [2, 1, 0]
    b = make_request("b", [*range(4), 50, 51, 52, 53, 54, 55, 56, 57, 58])  # hits block 0, needs 3 new
    hits, _ = manager.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0]
    assert not manager.can_allocate(b, 9, hits)  # 2 free besides the hit, 3 needed
    assert manager.allocate_slots(b, 9, hits) is None
    assert free_ids(manager) == [2, 1, 0] and refs(manager) == {}


def test_decode_appends_a_block_only_at_a_block_boundary():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(7)))
    schedule_prompt(manager, a)
    assert manager.get_block_ids("a") == [0, 1]
    a.output_token_ids.append(42)  # token 8 fits block 1
    assert manager.allocate_slots(a, 1) == []
    a.num_computed_tokens += 1
    assert cached_ids(manager) == {0, 1}  # block 1 is full now: cached
    a.output_token_ids.append(43)
    assert [b.block_id for b in manager.allocate_slots(a, 1)] == [2]
    assert manager.get_block_ids("a") == [0, 1, 2]


def test_without_prefix_caching_nothing_is_cached_or_hit():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, enable_caching=False)
    a = make_request("a", list(range(8)))
    schedule_prompt(manager, a)
    manager.free(a)
    assert cached_ids(manager) == set()
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)


def test_freeing_more_than_taken_is_an_error():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free_blocks([block])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
