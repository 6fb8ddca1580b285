"""How replicas are shared between the stable and the new revision (pure).

The rule, with the autoscaler's (or the spec's) desired total N and a weight w for the new
revision: each revision with a non-zero weight gets `ceil(N * weight / 100)` replicas, so each
has room for its share of the traffic and together they exceed N by at most one pod (Surge).
In place (no room for extra pods), the new revision gets `ceil(N * w / 100)` and the stable one
the rest. While the new revision is not yet at its share, the stable one keeps enough
replicas that ready pods never drop below N (Surge) or below N - 1 (InPlace, one pod at a
time), and never both revisions to zero ready.

At a total of 0 (an idle model scaled to zero, or `replicas: 0`) the new revision still gets
one pod and the stable one none: a rollout promotes a revision (and retires the old one) only
once it has had a ready pod, so a revision that cannot start is rolled back now, not found at
the next wake-up with nothing to roll back to. When requests wake the model the autoscaler's
total comes back and the rule above shares it again: the stable revision gets its pods beside
the new one's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

CapacityMode = Literal["Surge", "InPlace"]


def split_replicas(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Replicas per revision for weights in percent: ceil(total * weight / 100), 0 at weight 0."""
    return {name: math.ceil(total * weight / 100) if weight > 0 else 0 for name, weight in weights.items()}


def new_revision_share(total: int, weight: int) -> int:
    """The new revision's replicas at `weight`: ceil(total * weight / 100), and one pod at a
    total of 0 (see the module docstring); 0 at weight 0."""
    if weight <= 0:
        return 0
    return max(math.ceil(total * weight / 100), 1)


@dataclass(frozen=True)
class Shift:
    """Replicas to set on the new and the stable revision for this reconcile."""

    new: int
    stable: int
    blocked: str = ""  # why the new revision cannot gain a pod now (in place, last ready pod)


def shift_replicas(
    total: int,
    goal: dict[str, int],
    new_replicas: int,
    new_ready: int,
    stable_ready: int,
    mode: CapacityMode,
    one_at_a_time: bool,
) -> Shift:
    """Move toward `goal` ({"new": n, "stable": s}, from split_replicas) out of `total`.

    `new_replicas`/`new_ready`: what the new revision's Deployment has now. `one_at_a_time`:
    add new pods one by one (Rolling) rather than the whole goal at once (a canary step).
    """
    if total == 0:  # scaled to zero: only the new revision's pod, to prove it can become ready
        return Shift(new=goal["new"], stable=0)
    new_goal = min(goal["new"], total)
    if mode == "Surge":
        new = min(new_goal, new_ready + 1) if one_at_a_time else new_goal
        return Shift(new=new, stable=max(goal["stable"], total - min(new_ready, new_goal)))
    # In place: one new pod at a time, each taking the place of a stable one.
    # A new pod on its way (not ready yet): wait for it before taking another stable one.
    new = new_replicas if new_ready < new_replicas <= new_goal else min(new_goal, new_ready + 1)
    if total - new == 0 and new_ready == 0 and stable_ready > 0:
        blocked = "in place never takes the last ready stable pod before a new one is ready"
        return Shift(new=max(0, total - 1), stable=1, blocked=blocked)
    return Shift(new=new, stable=total - new)
