"""Revision weights: which revision gets a new request.

Smooth weighted round-robin (nginx's): every pick adds each revision's weight to its running
score, takes the highest, and subtracts the total from the winner. The split is exact over every
cycle of `total weight` picks and evenly interleaved (90/10 sends every tenth request to the
canary), unlike a random draw, whose 1,000-request split wanders by a few points.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class WeightedRoundRobin:
    scores: dict[str, int] = field(default_factory=dict)

    def pick(self, weights: Sequence[tuple[str, int]]) -> str | None:
        """A revision name from the (name, weight) pairs given; the caller passes only revisions
        with a healthy endpoint, so their weight goes to the others. None when every weight is 0
        (all drained)."""
        weights = [(name, weight) for name, weight in weights if weight > 0]
        total = sum(weight for _, weight in weights)
        if total == 0:
            return None
        self.scores = {name: self.scores.get(name, 0) + weight for name, weight in weights}
        chosen = max(weights, key=lambda pair: self.scores[pair[0]])[0]
        self.scores[chosen] -= total
        return chosen
