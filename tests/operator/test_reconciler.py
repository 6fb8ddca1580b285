"""One reconcile against the API emulator: a model that does not fit and a rejected apply stall
with their numbers or the API server's message, and neither is retried for the same spec."""

from typing import Any

import kubernetes.client
import pytest
from kvpilot.operator.executor import KubeClient
from kvpilot.operator.reconciler import reconcile


class CountingClient(KubeClient):
    """The real client, counting the plans it executes."""

    executed = 0

    def execute(self, plan):
        self.executed += 1
        return super().execute(plan)


@pytest.fixture
def client(apiserver) -> CountingClient:
    return CountingClient(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=apiserver.url)))


def stored(kubectl, namespace: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "kvpilot.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": namespace, "generation": 1},
        # Without the router: these reconciles never get as far as its endpoints.
        "spec": {"model": {"name": "m", "uri": "hf://Qwen/Qwen3-32B"}, "router": {"enabled": False}, **spec},
    }
    return kubectl.create("kvpilot.dev/v1alpha1", "inferenceservices", namespace, body)


def stalled(kubectl, namespace: str) -> dict[str, Any]:
    obj = kubectl.get("kvpilot.dev/v1alpha1", "inferenceservices", namespace, "chat")
    (condition,) = [c for c in obj["status"]["conditions"] if c["type"] == "Stalled"]
    return {**condition, "fit": obj["status"].get("fit"), "status_body": obj["status"]}


def test_a_model_that_does_not_fit_stalls_before_anything_is_applied(client, kubectl):
    spec = {
        "model": {"name": "m", "uri": "hf://Qwen/Qwen3-32B", "architecture": {"known": "Qwen3-32B"}},
        "engine": {"maxModelLen": 8192},
        "resources": {"gpu": {"count": 1, "memory": "48Gi"}},
    }
    body = stored(kubectl, "rec-fit", **spec)
    outcome = reconcile(body, client, now="2026-12-01T12:00:00Z")
    numbers = "weights 61.0 GiB + KV cache 2.0 GiB for one 8192-token sequence > 43.2 GiB (0.9 of 48.0 GiB)"
    assert (outcome.reason, outcome.status_written) == ("InsufficientGPUMemory", True)
    assert outcome.error == f"spec.resources.gpu.memory: does not fit: {numbers}"
    condition = stalled(kubectl, "rec-fit")
    assert (condition["status"], condition["reason"]) == ("True", "InsufficientGPUMemory")
    assert condition["fit"] == f"does not fit: {numbers}"
    assert client.executed == 0
    assert kubectl.list("apps/v1", "deployments", "rec-fit") == []


def test_a_rejected_apply_is_not_retried_for_the_same_generation(client, kubectl, apiserver):
    apiserver.server["patch /apis/apps/v1/namespaces/rec-422/deployments/chat"] << 422
    body = stored(kubectl, "rec-422")
    outcome = reconcile(body, client, now="2026-12-01T12:00:00Z")
    assert (outcome.reason, outcome.status_written) == ("ApplyRejected", True)
    assert outcome.error.startswith("apply Deployment: HTTP 422")
    condition = stalled(kubectl, "rec-422")
    assert (condition["status"], condition["reason"], condition["observedGeneration"]) == (
        "True",
        "ApplyRejected",
        1,
    )
    assert client.executed == 1

    again = reconcile({**body, "status": condition["status_body"]}, client, now="2026-12-01T12:01:00Z")
    assert (again.reason, again.status_written, client.executed) == ("ApplyRejected", False, 1)
    # A spec change (a new generation) is applied again.
    changed = {**body, "metadata": {**body["metadata"], "generation": 2}, "status": condition["status_body"]}
    reconcile(changed, client, now="2026-12-01T12:02:00Z")
    assert client.executed == 2
