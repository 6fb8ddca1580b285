"""Status from what was observed: kstatus conditions, transitions, invalid specs."""

from typing import Any

import pytest
from kvpilot.operator.status import compute_status, invalid_spec_status, status_changed

from tests.operator.test_builders import isvc

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def engine_only(**spec: Any):
    """The engine's own progress, without a router in front of it."""
    return isvc(router={"enabled": False}, **spec)


def deployment(generation=1, observed=1, replicas=2, updated=2, ready=2, conditions=None) -> dict[str, Any]:
    status = {
        "observedGeneration": observed,
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": ready,
    }
    if conditions:
        status["conditions"] = conditions
    return {"metadata": {"name": "chat", "generation": generation}, "status": status}


def summary(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


STUCK = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "stuck"}]
CASES = [
    ("no Deployment yet", None, ("False", "True", "False"), "CreatingDeployment"),
    ("controller behind", deployment(generation=2, observed=1), ("False", "True", "False"), "RolloutPending"),
    ("waiting for replicas", deployment(ready=1), ("False", "True", "False"), "WaitingForReplicas"),
    ("rolling", deployment(updated=1), ("False", "True", "False"), "WaitingForReplicas"),
    (
        "old replicas terminating",
        deployment(replicas=3),
        ("False", "True", "False"),
        "TerminatingOldReplicas",
    ),
    ("all ready", deployment(), ("True", "False", "False"), "ReplicasReady"),
    (
        "deadline exceeded",
        deployment(ready=1, conditions=STUCK),
        ("False", "False", "True"),
        "ProgressDeadlineExceeded",
    ),
]


@pytest.mark.parametrize(
    ("observed", "expected", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_conditions_table(observed, expected, reason):
    status = compute_status(engine_only(), observed, {}, T0)
    ready, reconciling, stalled = expected
    assert summary(status) == {
        "Ready": (ready, reason),
        "Reconciling": (reconciling, reason),
        "Stalled": (stalled, reason),
    }
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] == T0 for c in status["conditions"])


def test_status_fields():
    status = compute_status(engine_only(), deployment(ready=1), {}, T0)
    assert {k: v for k, v in status.items() if k != "conditions"} == {
        "observedGeneration": 3,
        "url": "http://chat.team-a.svc.cluster.local",
        "replicas": 2,
        "readyReplicas": 1,
        "selector": "app.kubernetes.io/name=kvpilot,app.kubernetes.io/instance=chat",
    }
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "1/2 replicas ready"


def test_transition_time_moves_only_on_a_flip_and_unchanged_status_is_not_rewritten():
    waiting = compute_status(engine_only(), deployment(ready=1), {}, T0)
    again = compute_status(engine_only(), deployment(ready=1), waiting, T1)
    assert again == waiting
    assert not status_changed(again, waiting)
    ready = compute_status(engine_only(), deployment(), waiting, T1)
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": T1, "Reconciling": T1, "Stalled": T0}
    assert status_changed(ready, waiting)


def test_invalid_spec_is_stalled_and_keeps_what_exists():
    previous = compute_status(engine_only(), deployment(), {}, T0)
    status = invalid_spec_status(4, "spec.model.uri: bad", previous, T1)
    assert summary(status) == {
        "Ready": ("False", "InvalidSpec"),
        "Reconciling": ("False", "InvalidSpec"),
        "Stalled": ("True", "InvalidSpec"),
    }
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["message"] == "spec.model.uri: bad"
    assert status["observedGeneration"] == 4
    assert (status["url"], status["readyReplicas"]) == (previous["url"], 2)


def test_with_autoscaling_the_deployments_own_count_is_desired():
    from kvpilot.operator.status import desired_replicas

    autoscaled = engine_only(autoscaling={"minReplicas": 2, "maxReplicas": 8, "target": 0.7})
    scaled = deployment(replicas=5, updated=5, ready=5)
    scaled["spec"] = {"replicas": 5}  # what the autoscaler set
    assert desired_replicas(autoscaled, scaled) == 5
    assert desired_replicas(autoscaled, None) == 2  # nothing scaled yet: the lower bound
    assert desired_replicas(engine_only(replicas=3), scaled) == 3
    status = compute_status(autoscaled, scaled, {}, T0)
    assert summary(status)["Ready"] == ("True", "ReplicasReady")


ROUTER_CASES = [
    ("both ready", deployment(), deployment(), [], ("True", "False", "False"), "ReplicasReady"),
    ("no router yet", deployment(), None, [], ("False", "True", "False"), "CreatingDeployment"),
    (
        "router starting",
        deployment(),
        deployment(ready=1),
        [],
        ("False", "True", "False"),
        "WaitingForReplicas",
    ),
    (
        "router stuck, engine starting",
        deployment(ready=1),
        deployment(ready=0, conditions=STUCK),
        [],
        ("False", "False", "True"),
        "ProgressDeadlineExceeded",
    ),
    (
        "a tenant's Secret missing",
        deployment(),
        deployment(),
        ["keys-a"],
        ("False", "False", "True"),
        "SecretNotFound",
    ),
]


@pytest.mark.parametrize(
    ("engine", "router", "missing", "expected", "reason"),
    [c[1:] for c in ROUTER_CASES],
    ids=[c[0] for c in ROUTER_CASES],
)
def test_router_conditions_table(engine, router, missing, expected, reason):
    tenants = [{"name": "team-a", "apiKeySecretRef": {"name": "keys-a", "key": "key"}}]
    status = compute_status(isvc(tenants=tenants), engine, {}, T0, router, missing)
    assert {kind: values[0] for kind, values in summary(status).items()} == dict(
        zip(("Ready", "Reconciling", "Stalled"), expected, strict=True)
    )
    assert summary(status)["Ready"][1] == reason


def test_router_messages_name_the_router_and_the_missing_secret():
    status = compute_status(isvc(), deployment(), {}, T0, deployment(ready=1))
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "router: 1/2 replicas ready"
    both = compute_status(isvc(), deployment(), {}, T0, deployment())
    assert next(c for c in both["conditions"] if c["type"] == "Ready")["message"] == (
        "2/2 replicas ready; router: 2/2 replicas ready"
    )
    tenants = [
        {"name": "team-a", "apiKeySecretRef": {"name": "shared", "key": "a"}},
        {"name": "team-b", "apiKeySecretRef": {"name": "shared", "key": "b"}},
    ]
    upstream = {"upstreamApiKeySecretRef": {"name": "shared", "key": "engine"}}
    stalled = compute_status(
        isvc(tenants=tenants, router=upstream), deployment(), {}, T0, deployment(), ["shared"]
    )
    message = next(c for c in stalled["conditions"] if c["type"] == "Stalled")["message"]
    assert message == (
        "Secret shared (spec.tenants[0] (team-a), spec.tenants[1] (team-b), "
        "spec.router.upstreamApiKeySecretRef) not found in namespace "
        "team-a: the pods that need it start once it exists"
    )
