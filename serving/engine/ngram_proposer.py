"""Draft tokens by prompt lookup: find the last n tokens earlier in the prompt + output and propose
the k tokens that followed them there. Plain Python, never touches torch.

Each request keeps an index from every n-gram seen so far to the position right after its
latest occurrence, extended by the tokens added since the last call, so a proposal costs
O(new tokens + k), not a scan of the whole sequence.
"""

import weakref
from dataclasses import dataclass, field

from kvpilot.serving.engine.request import Request


@dataclass
class _NgramIndex:
    next_position: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> position after it
    num_indexed: int = 0  # n-grams ending before this position are in the index


class NgramProposer:
    def __init__(self, n: int, num_speculative_tokens: int) -> None:
        self.n = n
        self.k = num_speculative_tokens
        # Keyed by the request object: an index goes away with its request.
        self._indexes: weakref.WeakKeyDictionary[Request, _NgramIndex] = weakref.WeakKeyDictionary()

    def propose(self, request: Request, max_tokens: int | None = None) -> list[int]:
        """Up to min(k, max_tokens) tokens that followed the latest earlier occurrence of the
        request's last n tokens; [] when there is none."""
        limit = self.k if max_tokens is None else min(self.k, max_tokens)
        if limit <= 0:
            return []
        return propose_from(
            request.all_token_ids, self.n, limit, self._indexes.setdefault(request, _NgramIndex())
        )


def propose_from(token_ids: list[int], n: int, k: int, index: _NgramIndex | None = None) -> list[int]:
    """The proposal for `token_ids` (a fresh index when none is given)."""
    index = index if index is not None else _NgramIndex()
    num_tokens = len(token_ids)
    if num_tokens <= n:
        return []
    # Index every n-gram that ends before the suffix, i.e. ends at a position <= num_tokens - 1.
    for end in range(max(index.num_indexed, n), num_tokens):
        index.next_position[tuple(token_ids[end - n : end])] = end
    index.num_indexed = max(index.num_indexed, num_tokens)
    start = index.next_position.get(tuple(token_ids[num_tokens - n :]))
    if start is None:
        return []
    # The copy runs on through its own proposal: a repeating pattern of period p < k yields k tokens.
    proposal: list[int] = []
    for position in range(start, start + k):
        proposal.append(token_ids[position] if position < num_tokens else proposal[position - num_tokens])
    return proposal
