"""Revision weights: which revision gets a new request."""

import random
from collections.abc import Sequence


def pick_revision(weights: Sequence[tuple[str, int]], rng: random.Random) -> str | None:
    """A revision name drawn in proportion to its weight, among the (name, weight) pairs given
    (the caller passes only revisions with a healthy endpoint, so their weight goes to the
    others); None when every weight is 0 (all drained)."""
    total = sum(weight for _, weight in weights)
    if total <= 0:
        return None
    point = rng.uniform(0, total)
    for name, weight in weights:
        point -= weight
        if point < 0 and weight > 0:
            return name
    return next(name for name, weight in reversed(weights) if weight > 0)
