"""Per-request block tables on top of the block pool, with automatic prefix caching.

Reference-count ownership: every block in a request's table holds exactly one reference for
that request; `free` drops them all. Blocks are registered in the prefix cache as soon as the
tokens that fill them are scheduled (draft tokens excepted: they may be rejected): the model
runner writes a step's K/V into the cache before any attention of that step reads it, so a
request scheduled in the same step may already hit them.
"""

from collections.abc import Sequence

from kvpilot.serving.engine.block_pool import ROOT_HASH, BlockPool, KVCacheBlock, hash_block_tokens
from kvpilot.serving.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._num_hashed_blocks: dict[str, int] = {}  # leading blocks already offered to the cache

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of the request, as blocks and as a token count.

        Never the whole request: the last token is always recomputed so that the step
        produces logits to sample from.
        """
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in self._block_hashes(request, max_blocks):
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def can_allocate(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] = ()
    ) -> bool:
        # Hits on free blocks leave the free queue, so they cannot also serve as new blocks.
        num_free_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        return self._num_required_blocks(request, num_new_tokens, new_computed_blocks) <= (
            self.block_pool.num_free_blocks - num_free_hits
        )

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] = ()
    ) -> list[KVCacheBlock] | None:
        """Blocks for `num_new_tokens` more tokens after the computed ones (and the prefix hits).

        Returns the newly taken blocks, or None (and changes nothing) when the pool is short.
        """
        if not self.can_allocate(request, num_new_tokens, new_computed_blocks):
            return None
        num_required = self._num_required_blocks(request, num_new_tokens, new_computed_blocks)
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        self.block_pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(max(num_required, 0))
        blocks.extend(new_blocks)
        num_tokens = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        # Draft tokens (beyond request.num_tokens) may yet be rejected: their blocks are not cached.
        self._cache_full_blocks(request, blocks, min(num_tokens, request.num_tokens))
        return new_blocks

    def free_slots_after(self, request: Request, num_tokens: int) -> None:
        """Give back the tail blocks that hold no token before `num_tokens` (the slots of rejected
        draft tokens). They were never cached, so they are plain free blocks again."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        num_needed = -(-num_tokens // self.block_size)
        if len(blocks) > num_needed:
            self.block_pool.free_blocks(reversed(blocks[num_needed:]))
            del blocks[num_needed:]

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks are freed first so they are evicted before
        the shared prefix blocks that other requests are more likely to hit."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_hashed_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, [])]

    def _num_required_blocks(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock]
    ) -> int:
        num_tokens = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        num_held = len(self.req_to_blocks.get(request.request_id, ())) + len(new_computed_blocks)
        return -(-num_tokens // self.block_size) - num_held

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        if not self.enable_caching:
            return
        num_full = num_tokens // self.block_size
        start = self._num_hashed_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.block_pool.cache_full_block(blocks[i], hashes[i])
        self._num_hashed_blocks[request.request_id] = num_full

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """Hashes of the request's first `num_blocks` full blocks, computed once per request."""
        hashes = request.block_hashes
        size = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(hash_block_tokens(parent, request.token_ids_slice(i * size, (i + 1) * size)))
        return hashes[:num_blocks]
