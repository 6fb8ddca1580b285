"""Why a revision's pods cannot become ready, as the rollout planner reads it."""

import pytest
from kvpilot.operator.rollout.observe import pod_failure


@pytest.mark.parametrize(
    ("terminated", "failure"),
    [
        (
            {"exitCode": 1, "reason": "Error"},
            "CrashLoopBackOff: container server (3 restarts, last exit code 1)",
        ),
        (
            {"exitCode": 137, "reason": "OOMKilled"},
            "CrashLoopBackOff: container server (3 restarts, last exit code 137 (OOMKilled))",
        ),
    ],
)
def test_a_crash_looping_revision_says_how_its_pods_last_exited(terminated, failure):
    container = {
        "name": "server",
        "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": terminated},
    }
    assert pod_failure({"status": {"containerStatuses": [container]}}) == failure
