"""When the rollout timer looks at an InferenceService (table)."""

import pytest
from kvpilot.operator.handlers import _rollout_active

AUTOSCALING = {"maxReplicas": 4, "target": 1}


@pytest.mark.parametrize(
    ("spec", "rollout", "ticks"),
    [
        ({}, {"phase": "Progressing", "revision": "b", "stableRevision": "a"}, True),
        ({}, {"phase": "Paused", "revision": "b", "stableRevision": "a"}, True),
        ({}, {"phase": "Promoted", "revision": "b", "stableRevision": "b"}, False),
        ({}, {"phase": "RolledBack", "revision": "b", "stableRevision": "a"}, False),
        # The operator shares the autoscaler's total while a rolled-back revision is kept.
        ({"autoscaling": AUTOSCALING}, {"phase": "RolledBack", "revision": "b", "stableRevision": "a"}, True),
        ({"autoscaling": AUTOSCALING}, {"phase": "Promoted", "revision": "b", "stableRevision": "b"}, False),
        ({"autoscaling": AUTOSCALING}, None, False),
    ],
)
def test_the_rollout_timer_runs_while_the_operator_shares_replicas(spec, rollout, ticks):
    status = {"rollout": rollout} if rollout else {}
    assert _rollout_active(spec=spec, status=status) is ticks
