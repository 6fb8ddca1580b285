"""The Argo CD health check (Lua), run by a real Lua runtime against sample statuses."""

from pathlib import Path

import pytest
from kvpilot.operator.status import compute_status, invalid_spec_status
from lupa import LuaRuntime

from tests.operator.test_builders import isvc
from tests.operator.test_status import STUCK, deployment

SCRIPT = (
    Path(__file__).resolve().parents[2] / "charts" / "argocd" / "inferenceservice-health.lua"
).read_text()
T0 = "2026-01-01T00:00:00Z"
ROUTER = deployment()  # the router's Deployment, all replicas ready
TENANTS = [{"name": "team-a", "apiKeySecretRef": {"name": "keys", "key": "team-a"}}]


def health(obj: dict) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    run = lua.eval(f"function(obj) {SCRIPT} end")
    result = run(to_lua(obj))
    return result["status"], result["message"]


def isvc_object(status: dict | None, generation: int = 3) -> dict:
    obj = {
        "apiVersion": "kvpilot.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"generation": generation},
    }
    if status is not None:
        obj["status"] = status
    return obj


CASES = [
    ("no status yet", None, 3, "Progressing"),
    ("waiting for replicas", compute_status(isvc(), deployment(ready=1), {}, T0, ROUTER), 3, "Progressing"),
    ("waiting for the router", compute_status(isvc(), deployment(), {}, T0, None), 3, "Progressing"),
    ("ready", compute_status(isvc(), deployment(), {}, T0, ROUTER), 3, "Healthy"),
    (
        "ready but for an older generation",
        compute_status(isvc(), deployment(), {}, T0, ROUTER),
        4,
        "Progressing",
    ),
    ("invalid spec", invalid_spec_status(3, "spec.model.uri: bad", {}, T0), 3, "Degraded"),
    (
        "stuck rollout",
        compute_status(isvc(), deployment(ready=0, conditions=STUCK), {}, T0, ROUTER),
        3,
        "Degraded",
    ),
    (
        "a tenant's Secret missing",
        compute_status(isvc(tenants=TENANTS), deployment(), {}, T0, ROUTER, ["keys"]),
        3,
        "Degraded",
    ),
]


@pytest.mark.parametrize(
    ("status", "generation", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_health_table(status, generation, expected):
    assert health(isvc_object(status, generation))[0] == expected


def test_degraded_message_carries_the_reason():
    status = invalid_spec_status(3, "spec.model.uri: bad", {}, T0)
    assert health(isvc_object(status)) == ("Degraded", "InvalidSpec: spec.model.uri: bad")
