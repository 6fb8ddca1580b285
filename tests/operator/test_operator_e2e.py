"""End to end: the real operator (kopf.testing.KopfRunner) against the kmock API emulator.

The test plays the user (kubectl) and the Deployment controller (patching Deployment status).
Each test uses its own namespace on one shared emulator.
"""

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from kopf.testing import KopfRunner
from kvpilot.operator.labels import SPEC_HASH_ANNOTATION
from kvpilot.operator.models import API_VERSION, KIND

from tests.operator.apiserver import free_port

ISVC_API, ISVC = "kvpilot.dev/v1alpha1", "inferenceservices"
OPERATOR_ARGS = ["run", "--standalone", "--all-namespaces", "-m", "kvpilot.operator.handlers"]

pytestmark = pytest.mark.timeout(120)


def manifest(namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "model": {"name": "smollm2", "uri": "pvc://models/smollm2"},
            "engine": {"quantization": "int4", "kvCacheDtype": "int8", "maxModelLen": 4096},
            "resources": {"gpu": {"count": 1}, "memory": "16Gi"},
            "replicas": 2,
            **spec,
        },
    }


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond
    return {}


def play_deployment_controller(kubectl, namespace: str, ready: int) -> None:
    deployment = kubectl.get("apps/v1", "deployments", namespace, "chat")
    replicas = deployment["spec"]["replicas"]
    status = {
        "observedGeneration": deployment["metadata"]["generation"],
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": ready,
        "availableReplicas": ready,
    }
    kubectl.patch("apps/v1", "deployments", namespace, "chat", {"status": status}, sub="status")


def test_create_then_ready_then_update_drift_and_delete(apiserver, kubectl):
    ns = "team-a"
    with KopfRunner(OPERATOR_ARGS, timeout=60) as runner:
        created = kubectl.create(ISVC_API, ISVC, ns, manifest(ns))
        uid = created["metadata"]["uid"]

        deployment = wait_for(lambda: kubectl.get("apps/v1", "deployments", ns, "chat"), "the Deployment")
        service = wait_for(lambda: kubectl.get("v1", "services", ns, "chat"), "the Service")
        pdb = wait_for(lambda: kubectl.get("policy/v1", "poddisruptionbudgets", ns, "chat"), "the PDB")
        for child in (deployment, service, pdb):
            assert child["metadata"]["ownerReferences"] == [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": "chat",
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert deployment["spec"]["replicas"] == 2
        assert container["args"][container["args"].index("--quantization") + 1] == "int4"
        assert container["args"][container["args"].index("--max-model-len") + 1] == "4096"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert service["spec"]["ports"] == [
            {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
        ]

        # Not ready until the Deployment controller (the test) reports ready replicas.
        isvc = wait_for(lambda: condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Reconciling"), "status")
        assert condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Ready")["status"] == "False"
        play_deployment_controller(kubectl, ns, ready=2)
        wait_for(
            lambda: condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Ready").get("status") == "True",
            "Ready=True",
        )
        isvc = kubectl.get(ISVC_API, ISVC, ns, "chat")
        assert isvc["status"]["observedGeneration"] == 1
        assert isvc["status"]["url"] == "http://chat.team-a.svc.cluster.local"
        assert (isvc["status"]["replicas"], isvc["status"]["readyReplicas"]) == (2, 2)
        assert isvc["status"]["selector"] == "app.kubernetes.io/name=kvpilot,app.kubernetes.io/instance=chat"
        assert condition(isvc, "Stalled")["status"] == "False"

        # A spec change rolls the Deployment; observedGeneration follows.
        kubectl.patch(ISVC_API, ISVC, ns, "chat", {"spec": {"engine": {"maxModelLen": 8192}}})

        def rolled() -> bool:
            args = kubectl.get("apps/v1", "deployments", ns, "chat")["spec"]["template"]["spec"][
                "containers"
            ][0]
            return args["args"][args["args"].index("--max-model-len") + 1] == "8192"

        wait_for(rolled, "the Deployment to roll")
        wait_for(
            lambda: kubectl.get(ISVC_API, ISVC, ns, "chat")["status"]["observedGeneration"] == 2,
            "observedGeneration 2",
        )
        play_deployment_controller(kubectl, ns, ready=2)
        wait_for(
            lambda: (
                condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Ready").get("observedGeneration") == 2
            ),
            "Ready for generation 2",
        )

        # Drift: an owned field edited by hand is put back; a field the operator does not own stays.
        patched = kubectl.patch(
            "apps/v1",
            "deployments",
            ns,
            "chat",
            {"metadata": {"labels": {"team": "a"}}, "spec": {"replicas": 5}},
        )
        assert patched["spec"]["replicas"] == 5
        wait_for(
            lambda: kubectl.get("apps/v1", "deployments", ns, "chat")["spec"]["replicas"] == 2, "drift revert"
        )
        assert kubectl.get("apps/v1", "deployments", ns, "chat")["metadata"]["labels"]["team"] == "a"
        kubectl.patch("v1", "services", ns, "chat", {"spec": {"ports": [{"name": "http", "port": 8080}]}})
        wait_for(
            lambda: kubectl.get("v1", "services", ns, "chat")["spec"]["ports"][0]["port"] == 80,
            "Service drift revert",
        )

        # Delete: the garbage collector (emulated) removes the children; the operator recreates nothing.
        kubectl.delete(ISVC_API, ISVC, ns, "chat")
        wait_for(lambda: not kubectl.list("apps/v1", "deployments", ns), "children gone")
        time.sleep(1)
        assert kubectl.list("apps/v1", "deployments", ns) == []
        assert kubectl.list("v1", "services", ns) == []
        assert kubectl.list("policy/v1", "poddisruptionbudgets", ns) == []
    assert runner.exception is None
    assert runner.exit_code == 0


def test_invalid_spec_stalls_with_event_and_recovers(apiserver, kubectl):
    ns = "team-invalid"
    bad = manifest(ns, autoscaling={"minReplicas": 1, "maxReplicas": 3, "target": 0.7})  # and replicas: 2
    with KopfRunner(OPERATOR_ARGS, timeout=60) as runner:
        kubectl.create(ISVC_API, ISVC, ns, bad)
        stalled = wait_for(
            lambda: (
                condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Stalled").get("status") == "True"
                and condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Stalled")
            ),
            "Stalled=True",
        )
        assert stalled["reason"] == "InvalidSpec"
        assert "spec.replicas and spec.autoscaling are mutually exclusive" in stalled["message"]
        assert condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Ready")["status"] == "False"
        events = wait_for(
            lambda: [e for e in kubectl.list("v1", "events", ns) if e.get("reason") == "InvalidSpec"],
            "the Event",
        )
        assert events[0]["type"] == "Warning"
        assert "spec.replicas" in events[0]["message"]
        assert kubectl.list("apps/v1", "deployments", ns) == []

        # A malformed URI names its field too; the operator keeps running.
        kubectl.patch(
            ISVC_API, ISVC, ns, "chat", {"spec": {"autoscaling": None, "model": {"uri": "ftp://x/y"}}}
        )
        wait_for(
            lambda: (
                "spec.model.uri" in condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Stalled")["message"]
            ),
            "Stalled on spec.model.uri",
        )

        # Fixing the spec recovers: the Deployment appears and Stalled turns False.
        kubectl.patch(ISVC_API, ISVC, ns, "chat", {"spec": {"model": {"uri": "pvc://models/smollm2"}}})
        wait_for(lambda: kubectl.get("apps/v1", "deployments", ns, "chat"), "the Deployment")
        wait_for(
            lambda: condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Stalled").get("status") == "False",
            "Stalled=False",
        )
    assert runner.exception is None


def _settle(apiserver, quiet: float = 1.5, timeout: float = 20) -> None:
    """Wait until the operator has made no request for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    count, since = apiserver.request_count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now_count = apiserver.request_count()
        if now_count != count:
            count, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError("the operator never went quiet")


def test_restart_makes_no_writes(apiserver, kubectl):
    ns = "team-restart"
    with KopfRunner(OPERATOR_ARGS, timeout=60):
        kubectl.create(ISVC_API, ISVC, ns, manifest(ns))
        wait_for(lambda: kubectl.get("apps/v1", "deployments", ns, "chat"), "the Deployment")
        play_deployment_controller(kubectl, ns, ready=2)
        wait_for(
            lambda: condition(kubectl.get(ISVC_API, ISVC, ns, "chat"), "Ready").get("status") == "True",
            "Ready=True",
        )
        _settle(apiserver)
    before = apiserver.request_count()
    deployment_before = kubectl.get("apps/v1", "deployments", ns, "chat")

    with KopfRunner(OPERATOR_ARGS, timeout=60) as runner:
        # The resumed operator reads the InferenceService and its children ...
        wait_for(
            lambda: any(
                "/namespaces/team-restart/deployments" in r for r in apiserver.requests(since=before)
            ),
            "the resumed reconcile",
        )
        _settle(apiserver)
    # ... and writes nothing: no child, no status, no annotation.
    assert apiserver.writes(since=before) == []
    deployment_after = kubectl.get("apps/v1", "deployments", ns, "chat")
    assert deployment_after["metadata"]["resourceVersion"] == deployment_before["metadata"]["resourceVersion"]
    assert deployment_after["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    assert runner.exception is None


def test_kvpilot_operator_command_runs_the_operator(apiserver, kubectl, tmp_path):
    """`kvpilot operator` (the console entry point's subcommand) as a real process."""
    ns = "team-cli"
    kubectl.create(ISVC_API, ISVC, ns, manifest(ns, replicas=1))
    port = free_port()
    command = [sys.executable, "-m", "kvpilot.operator.cli", "operator", "-n", ns]
    command += ["--liveness", f"http://127.0.0.1:{port}/healthz"]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: kubectl.get("apps/v1", "deployments", ns, "chat"), "the Deployment", timeout=30)
        assert wait_for(lambda: _healthz(port), "the liveness endpoint") == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "Handler 'reconcile_inference_service' succeeded" in output


def _healthz(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code
    except httpx.HTTPError:
        return None


def test_transient_api_errors_are_retried_with_backoff(apiserver, kubectl):
    ns = "team-flaky"
    path = f"/apis/apps/v1/namespaces/{ns}/deployments"
    apiserver.server[f"get {path}"][:2] << 503  # the first two reads of the children fail
    with KopfRunner(OPERATOR_ARGS, timeout=60) as runner:
        start = time.monotonic()
        kubectl.create(ISVC_API, ISVC, ns, manifest(ns, replicas=1))
        wait_for(lambda: kubectl.get("apps/v1", "deployments", ns, "chat"), "the Deployment", timeout=30)
        elapsed = time.monotonic() - start
    reads = [r for r in apiserver.requests() if r == f"GET {path}"]
    assert len(reads) >= 3
    assert elapsed >= 1 + 2  # kopf.TemporaryError delays: 1 s, then 2 s
    assert runner.exception is None
