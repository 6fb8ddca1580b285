"""One desired total shared out between the engine Deployments that serve an InferenceService.

Today there is one engine Deployment, which gets everything. With revisions (a canary), each
revision's Deployment gets its share of the total in proportion to its traffic weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def share_replicas(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """`total` split in proportion to `weights` (largest remainder, ties to the first named), so the
    shares always add up to `total`; all weights zero share equally."""
    if not weights:
        return {}
    weight_sum = sum(weights.values())
    if weight_sum <= 0:
        weights, weight_sum = dict.fromkeys(weights, 1.0), float(len(weights))
    exact = {name: total * weight / weight_sum for name, weight in weights.items()}
    shares = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(weights, key=lambda name: shares[name] - exact[name])  # stable: ties keep order
    for name in by_remainder[: total - sum(shares.values())]:
        shares[name] += 1
    return shares
