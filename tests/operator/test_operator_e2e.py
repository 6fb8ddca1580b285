"""End to end: the real operator process on a real control plane (tests/cluster).

kube-apiserver admits, defaults and stores; the Deployment and ReplicaSet controllers, the
scheduler, the EndpointSlice controller and the garbage collector are the real ones; the process
kubelet runs the engine pods as `kvpilot serve` processes on a tiny checkpoint. The test plays the
user only. Each test uses its own namespace; one operator process runs at a time.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from kvpilot.operator.api import API_VERSION, GROUP, KIND, PLURAL
from kvpilot.operator.crd import CRD_PATH, build_crd
from kvpilot.operator.labels import MANAGER, SPEC_HASH_ANNOTATION

from tests.checkpoints import build_checkpoint
from tests.cluster.cgroups import memory_cgroups_available
from tests.cluster.harness import OperatorProcess, condition, provide_model_volume, wait_for
from tests.cluster.kubeapi import ApiError
from tests.cluster.kubectl import Kubectl, helm
from tests.cluster.processes import pid_alive

ISVC = PLURAL
WRITES = {"create", "update", "patch", "delete", "deletecollection"}

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A directory holding `smollm2`: a tiny random llama with the real tokenizer (hostPath of the PV)."""
    directory = tmp_path_factory.mktemp("models")
    build_checkpoint("llama", directory / "smollm2", tokenizer_dir)
    return directory


@pytest.fixture(scope="module")
def kubectl(cluster) -> Kubectl:
    kubectl = Kubectl(cluster.kubeconfig)
    kubectl.apply("-f", str(CRD_PATH))
    # Polled here: `kubectl wait` fails outright on a CRD whose status has no conditions yet.
    crd = ("apiextensions.k8s.io/v1", "customresourcedefinitions", None, f"{PLURAL}.{GROUP}")
    wait_for(lambda: condition(cluster.api.get(*crd), "Established").get("status") == "True", "the CRD")
    return kubectl


@pytest.fixture
def api(cluster, kubectl):
    return cluster.api


@pytest.fixture
def ns(api, model_dir):
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    api.create("v1", "namespaces", None, {"metadata": {"name": name}})
    provide_model_volume(api, name, model_dir)
    yield name
    api.delete("v1", "namespaces", None, name)
    api.delete("v1", "persistentvolumes", None, f"models-{name}")


@pytest.fixture
def operator(cluster, kubectl):
    with OperatorProcess(cluster.control_plane) as running:
        yield running


def manifest(namespace: str, **spec: Any) -> dict[str, Any]:
    """The engine alone (no router pods to start) unless a test asks for the router. A 64 MiB KV
    cache: pre-faulting the server's 1 GiB default took ~2.5 s of each engine start here (the
    process kubelet sets no memory limit, so the server does not cap it to the pod's 1Gi)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "model": {"name": "smollm2", "uri": "pvc://models/smollm2"},
            "engine": {
                "quantization": "int4",
                "kvCacheDtype": "int8",
                "maxModelLen": 1024,
                "kvCacheMemory": "64Mi",
            },
            "resources": {"memory": "1Gi"},
            "replicas": 1,
            "router": {"enabled": False},
            **spec,
        },
    }


def isvc_condition(api, ns: str, kind: str, name: str = "chat") -> dict[str, Any]:
    return condition(api.get(API_VERSION, ISVC, ns, name), kind)


def engine_pids(api, ns: str) -> list[int]:
    pods = api.list("v1", "pods", ns)
    ids = [
        s.get("containerID", "") for p in pods for s in (p.get("status") or {}).get("containerStatuses") or []
    ]
    return [int(i.removeprefix("process://")) for i in ids if i]


def engine_deployment(api, ns: str, name: str = "chat") -> dict[str, Any] | None:
    """The Deployment of the revision serving now (status.rollout.stableRevision)."""
    isvc = api.get(API_VERSION, ISVC, ns, name) or {}
    stable = ((isvc.get("status") or {}).get("rollout") or {}).get("stableRevision")
    return api.get("apps/v1", "deployments", ns, f"{name}-{stable}") if stable else None


def condition_with_reason(api, ns: str, kind: str, reason: str, timeout: float = 30) -> dict[str, Any]:
    """The InferenceService's `kind` condition, once its reason is `reason`."""

    def reached() -> dict[str, Any] | None:
        found = isvc_condition(api, ns, kind)
        return found if found.get("reason") == reason else None

    return wait_for(reached, f"{kind}={reason}", timeout=timeout)


def server_args(deployment: dict[str, Any]) -> list[str]:
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def serving_args(api, ns: str) -> list[str]:
    """The server's arguments in the serving revision's Deployment (none while there is none)."""
    deployment = engine_deployment(api, ns)
    return server_args(deployment) if deployment else []


def test_create_ready_roll_drift_and_delete(api, ns, operator):
    created = api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=2))
    uid = created["metadata"]["uid"]
    assert created["spec"]["engine"]["tensorParallelSize"] == 1  # defaulted by the API server

    deployment = wait_for(lambda: engine_deployment(api, ns), "the Deployment")
    first_revision = deployment["metadata"]["labels"]["kvpilot.dev/revision"]
    assert deployment["metadata"]["name"] == f"chat-{first_revision}"
    service = wait_for(lambda: api.get("v1", "services", ns, "chat"), "the Service")
    pdb = wait_for(lambda: api.get("policy/v1", "poddisruptionbudgets", ns, "chat"), "the PDB")
    for child in (deployment, service, pdb):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": "chat",
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    assert server_args(deployment)[server_args(deployment).index("--quantization") + 1] == "int4"

    # Ready only once the real Deployment controller counts two ready engine pods.
    assert isvc_condition(api, ns, "Ready").get("status") != "True"
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=180)
    isvc = api.get(API_VERSION, ISVC, ns, "chat")
    assert (isvc["status"]["replicas"], isvc["status"]["readyReplicas"]) == (2, 2)
    assert isvc["status"]["observedGeneration"] == 1
    assert isvc["status"]["url"] == f"http://chat.{ns}.svc.cluster.local"
    pods = api.list("v1", "pods", ns)
    slices = api.list(
        "discovery.k8s.io/v1", "endpointslices", ns, labelSelector="kubernetes.io/service-name=chat"
    )
    listed = {address for s in slices for e in s.get("endpoints") or [] for address in e["addresses"]}
    assert listed == {p["status"]["podIP"] for p in pods}

    # A spec change is a new revision, rolled pod by pod; observedGeneration and Ready follow.
    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})
    wait_for(
        lambda: (
            isvc_condition(api, ns, "Ready").get("observedGeneration") == 2
            and isvc_condition(api, ns, "Ready")["status"] == "True"
        ),
        "Ready for generation 2",
        timeout=240,
    )
    assert "8" in server_args(engine_deployment(api, ns))
    isvc = api.get(API_VERSION, ISVC, ns, "chat")
    rollout = isvc["status"]["rollout"]
    assert rollout["phase"] == "Promoted" and rollout["stableRevision"] != first_revision
    assert [h["reason"] for h in rollout["history"]] == ["FirstRevision", "RolloutStarted", "Promoted"]
    assert [(r["hash"], r["phase"]) for r in isvc["status"]["revisions"]][-1] == (first_revision, "Retired")
    wait_for(
        lambda: not api.get("apps/v1", "deployments", ns, f"chat-{first_revision}"),
        "the retired revision's Deployment to be deleted",
    )
    engine = engine_deployment(api, ns)["metadata"]["name"]

    # Drift by a second field manager: the operator's field is taken back, the other field stays.
    drift = {"metadata": {"labels": {"team": "a"}}, "spec": {"replicas": 5}}
    api.patch("apps/v1", "deployments", ns, engine, drift, fieldManager="someone-else")
    wait_for(lambda: api.get("apps/v1", "deployments", ns, engine)["spec"]["replicas"] == 2, "drift revert")
    deployment = api.get("apps/v1", "deployments", ns, engine)
    assert deployment["metadata"]["labels"]["team"] == "a"
    owners = {
        entry["manager"]: json.dumps(entry.get("fieldsV1"))
        for entry in deployment["metadata"]["managedFields"]
    }
    assert '"f:replicas"' in owners[MANAGER]
    assert '"f:team"' in owners["someone-else"] and '"f:replicas"' not in owners["someone-else"]
    # Server-side apply by another manager conflicts on the operator's field unless forced.
    with pytest.raises(ApiError) as conflict:
        api.apply(
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": engine, "namespace": ns},
             "spec": {"replicas": 3}},
            field_manager="someone-else",
        )  # fmt: skip
    assert conflict.value.status_code == 409 and MANAGER in conflict.value.message
    # An owned field of a list entry (ports are keyed by port and protocol) drifts and is taken back.
    drifted_port = {"spec": {"ports": [{"port": 80, "protocol": "TCP", "targetPort": 9999}]}}
    api.patch("v1", "services", ns, "chat", drifted_port, kind="strategic", fieldManager="someone-else")
    wait_for(
        lambda: api.get("v1", "services", ns, "chat")["spec"]["ports"][0]["targetPort"] == "http",
        "Service revert",
    )

    # Delete: the real garbage collector removes the children; the engine processes are stopped.
    pids = engine_pids(api, ns)  # the two engines, and any the replicas drift started that still drain
    assert len(pids) >= 2
    api.delete(API_VERSION, ISVC, ns, "chat")
    wait_for(lambda: not api.list("apps/v1", "deployments", ns), "the Deployment to be collected")
    wait_for(lambda: not api.list("v1", "pods", ns), "the pods to be gone", timeout=120)
    assert not [pid for pid in pids if pid_alive(pid)]
    assert api.list("v1", "services", ns) == []
    assert api.list("policy/v1", "poddisruptionbudgets", ns) == []
    time.sleep(1)
    assert api.list("apps/v1", "deployments", ns) == []  # the operator recreated nothing
    assert operator.stop() == 0
    assert "Handler 'reconcile_inference_service' succeeded" in operator.output()


def _crd_without_cel() -> dict[str, Any]:
    crd = build_crd()
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec.pop("x-kubernetes-validations")
    return crd


def test_an_object_stored_before_a_rule_existed_stalls_with_an_event_and_recovers(cluster, api, ns, kubectl):
    # An object the current CRD rejects can only exist from before its rule: store it that way.
    bad = manifest(ns, podLabels={"app.kubernetes.io/name": "mine"})
    other = {**bad, "metadata": {"name": "other", "namespace": ns}}

    def rule_is_back() -> bool:  # the API server compiles an applied CRD's rules asynchronously
        try:
            api.create(API_VERSION, ISVC, ns, other, dryRun="All")
        except ApiError as error:
            return "must not set the operator's" in error.message
        return False

    kubectl.apply("-f", "-", stdin=json.dumps(_crd_without_cel()))
    try:
        wait_for(lambda: not rule_is_back(), "the CRD without its rules to be in effect")
        api.create(API_VERSION, ISVC, ns, bad)
    finally:
        kubectl.apply("-f", str(CRD_PATH))
    wait_for(rule_is_back, "the CRD's rules to be enforced again", timeout=60)
    with pytest.raises(ApiError, match="must not set the operator's"):  # the rule is back
        api.create(API_VERSION, ISVC, ns, other)

    with OperatorProcess(cluster.control_plane):
        stalled = wait_for(
            lambda: (
                isvc_condition(api, ns, "Stalled").get("status") == "True"
                and isvc_condition(api, ns, "Stalled")
            ),
            "Stalled=True",
        )
        assert stalled["reason"] == "InvalidSpec"
        assert "spec.podLabels must not set the operator's" in stalled["message"]
        assert isvc_condition(api, ns, "Ready")["status"] == "False"
        events = wait_for(
            lambda: [e for e in api.list("v1", "events", ns) if e.get("reason") == "InvalidSpec"], "the Event"
        )
        assert events[0]["type"] == "Warning" and "spec.podLabels" in events[0]["message"]
        assert api.list("apps/v1", "deployments", ns) == []

        # Fixing the spec passes admission (CEL ratchets) and recovers.
        api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"podLabels": None}})
        wait_for(lambda: engine_deployment(api, ns), "the Deployment")
        wait_for(lambda: isvc_condition(api, ns, "Stalled").get("status") == "False", "Stalled=False")


def _settle(operator: OperatorProcess, quiet: float = 3, timeout: float = 60) -> None:
    """Wait until the operator has completed no request for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    count, since = len(operator.requests()), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now_count = len(operator.requests())
        if now_count != count:
            count, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError("the operator never went quiet")


def _writes(requests: list[dict], ns: str) -> list[str]:
    return [
        f"{r['verb']} {r['requestURI']}"
        for r in requests
        if r["verb"] in WRITES and (r.get("objectRef") or {}).get("namespace") == ns
    ]


def test_restart_makes_no_writes(cluster, api, ns):
    with OperatorProcess(cluster.control_plane) as first:
        api.create(API_VERSION, ISVC, ns, manifest(ns))
        wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=180)
        _settle(first)
    before = len(first.requests())
    deployment_before = engine_deployment(api, ns)
    isvc_before = api.get(API_VERSION, ISVC, ns, "chat")

    with OperatorProcess(cluster.control_plane) as second:
        # The resumed operator reads the InferenceService's children ...
        wait_for(
            lambda: any(
                r["verb"] == "list" and f"/namespaces/{ns}/deployments" in r["requestURI"]
                for r in second.requests()[before:]
            ),
            "the resumed reconcile",
        )
        _settle(second)
        # ... and writes nothing: no child, no status, no annotation.
        assert _writes(second.requests()[before:], ns) == []
    deployment_after = engine_deployment(api, ns)
    assert deployment_after["metadata"]["resourceVersion"] == deployment_before["metadata"]["resourceVersion"]
    assert deployment_after["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    assert (
        api.get(API_VERSION, ISVC, ns, "chat")["metadata"]["resourceVersion"]
        == (isvc_before["metadata"]["resourceVersion"])
    )


def test_the_operator_rides_out_an_api_server_outage(cluster, api, ns, operator):
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=0))
    wait_for(lambda: engine_deployment(api, ns), "the Deployment")

    cluster.control_plane.stop_api_server()
    time.sleep(3)  # the operator's watches and requests fail meanwhile
    assert operator.process.popen.poll() is None
    cluster.control_plane.start_api_server()

    # Its watches come back: a new InferenceService and a spec change are both reconciled.
    second = {**manifest(ns, replicas=0), "metadata": {"name": "second", "namespace": ns}}
    api.create(API_VERSION, ISVC, ns, second)
    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 4}}})
    wait_for(lambda: engine_deployment(api, ns, "second"), "the second Deployment", timeout=90)
    wait_for(  # the new revision's Deployment, once the status names it as serving
        lambda: "4" in serving_args(api, ns),
        "the update after the outage",
        timeout=90,
    )
    assert operator.healthz() == 200


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpu-smollm2.yaml"


def test_live_example_serves_a_chat_completion_through_its_endpoints(
    api, kubectl, operator, tmp_path, default_gguf
):
    """examples/cpu-smollm2.yaml as is: its Service's endpoints (router pods) -> a real chat
    completion through the router and the engine -> delete."""
    example = yaml.safe_load(EXAMPLE.read_text())
    ns, name = example["metadata"]["namespace"], example["metadata"]["name"]
    claim, _, file_name = example["spec"]["model"]["uri"].removeprefix("pvc://").partition("/")
    models = tmp_path / "models"
    models.mkdir()
    (models / file_name).symlink_to(default_gguf)  # the default model, under the example's file name
    provide_model_volume(api, ns, models, claim=claim)
    try:
        kubectl.apply("-f", str(EXAMPLE))
        wait_for(
            lambda: isvc_condition(api, ns, "Ready", name).get("status") == "True", "Ready=True", timeout=240
        )

        def ready_slices() -> list[dict[str, Any]] | None:
            """The Service's EndpointSlices once they list a ready endpoint (the EndpointSlice
            controller writes them a moment after the pods turn ready, which Ready follows)."""
            slices = api.list(
                "discovery.k8s.io/v1",
                "endpointslices",
                ns,
                labelSelector=f"kubernetes.io/service-name={name}",
            )
            ready = any(e["conditions"].get("ready") for s in slices for e in s.get("endpoints") or [])
            return slices if ready else None

        slices = wait_for(ready_slices, "a ready endpoint in the Service's EndpointSlices", timeout=60)
        endpoints = [e for s in slices for e in s.get("endpoints") or [] if e["conditions"].get("ready")]
        (port,) = {p["port"] for s in slices for p in s.get("ports") or []}
        routers = f"app.kubernetes.io/name=kvpilot-router,app.kubernetes.io/instance={name}"
        assert sorted(a for e in endpoints for a in e["addresses"]) == sorted(
            p["status"]["podIP"] for p in api.list("v1", "pods", ns, labelSelector=routers)
        )
        address = endpoints[0]["addresses"][0]

        response = httpx.post(
            f"http://{address}:{port}/v1/chat/completions",
            json={
                "model": example["spec"]["model"]["name"],
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=120,
        )
        assert response.status_code == 200, response.text
        completion = response.json()
        assert completion["choices"][0]["message"]["content"].strip()
        assert completion["usage"]["completion_tokens"] > 0

        pids = engine_pids(api, ns)
        assert pids and all(pid_alive(pid) for pid in pids)
        kubectl.run("delete", "-f", str(EXAMPLE))
        wait_for(
            lambda: not [p for p in api.list("v1", "pods", ns) if p["metadata"]["name"].startswith(name)],
            "the engine pods to be gone",
            timeout=120,
        )
        assert not [pid for pid in pids if pid_alive(pid)]
    finally:
        kubectl.run("delete", "--ignore-not-found", "-f", str(EXAMPLE))
        api.delete("v1", "persistentvolumeclaims", ns, claim)
        api.delete("v1", "persistentvolumes", None, f"{claim}-{ns}")


def router_url(api, ns: str) -> str:
    """The base URL of a ready router pod."""
    pods = api.list("v1", "pods", ns, labelSelector="app.kubernetes.io/name=kvpilot-router")
    ready = [p for p in pods if condition(p, "Ready").get("status") == "True"]
    port = ready[0]["spec"]["containers"][0]["ports"][0]["containerPort"]
    return f"http://{ready[0]['status']['podIP']}:{port}"


def _stalled(api, ns: str) -> dict[str, Any]:
    return wait_for(
        lambda: (
            isvc_condition(api, ns, "Stalled").get("status") == "True" and isvc_condition(api, ns, "Stalled")
        ),
        "Stalled=True",
        timeout=120,
    )


BAD_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "Near", "values": ["a"]}]}
            ]
        }
    }
}


def test_a_rejected_apply_stalls_with_the_api_servers_message_and_recovers(api, ns, operator):
    """A typo in spec.scheduling.affinity passes the CRD (an Affinity is copied as is) and the API
    server rejects the Deployment (422): status and a Warning Event say so, the operator does not
    retry the same spec, and fixing the spec recovers."""
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=0, scheduling={"affinity": BAD_AFFINITY}))
    stalled = _stalled(api, ns)
    assert stalled["reason"] == "ApplyRejected"
    assert "nodeSelectorTerms[0].matchExpressions[0].operator" in stalled["message"]
    assert "Near" in stalled["message"] and stalled["observedGeneration"] == 1
    assert isvc_condition(api, ns, "Ready")["status"] == "False"
    events = wait_for(
        lambda: [e for e in api.list("v1", "events", ns) if e.get("reason") == "ApplyRejected"], "the Event"
    )
    assert events[0]["type"] == "Warning" and "operator" in events[0]["message"]
    # No hot loop: the same generation is not applied again.
    _settle(operator)
    applies = [
        r
        for r in operator.requests()
        if r["verb"] == "patch" and f"/namespaces/{ns}/deployments" in r["requestURI"]
    ]
    assert len(applies) == 1
    assert [
        d for d in api.list("apps/v1", "deployments", ns) if "kvpilot.dev/revision" in d["metadata"]["labels"]
    ] == []

    fixed = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}]}}}  # fmt: skip
    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"scheduling": {"affinity": fixed}}})
    wait_for(lambda: engine_deployment(api, ns), "the Deployment")
    wait_for(lambda: isvc_condition(api, ns, "Stalled").get("status") == "False", "Stalled=False")
    assert isvc_condition(api, ns, "Ready")["observedGeneration"] == 2


def test_status_names_an_unschedulable_pod(api, ns, operator):
    """Four GPUs per replica on nodes with one: the scheduler's own message reaches the status."""
    api.create(API_VERSION, ISVC, ns, manifest(ns, resources={"gpu": {"count": 4}}))
    waiting = condition_with_reason(api, ns, "Reconciling", "Unschedulable", timeout=120)
    assert waiting["status"] == "True"
    assert "cannot be scheduled" in waiting["message"] and "Insufficient nvidia.com/gpu" in waiting["message"]
    assert isvc_condition(api, ns, "Ready")["reason"] == "Unschedulable"


def test_a_failing_model_download_job_stalls_the_inference_service(api, ns, operator, tmp_path):
    """spec.model.cache: a claim and one download Job; the download fails (no such repository,
    nothing reachable), the Job gives up, and Stalled carries the Job's and the container's words."""
    volume = f"cache-{ns}"
    api.create("v1", "persistentvolumes", None, {
        "metadata": {"name": volume},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Delete", "hostPath": {"path": str(tmp_path)}},
    })  # fmt: skip
    try:
        model = {
            "name": "nothing",
            "uri": "hf://kvpilot-e2e/does-not-exist",
            "cache": {"storageClassName": "", "size": "1Gi", "accessMode": "ReadWriteOnce"},
        }
        api.create(API_VERSION, ISVC, ns, manifest(ns, model=model))
        jobs = wait_for(lambda: api.list("batch/v1", "jobs", ns), "the download Job")
        (claim,) = api.list(
            "v1", "persistentvolumeclaims", ns, labelSelector="app.kubernetes.io/instance=chat"
        )
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        deployment = wait_for(lambda: engine_deployment(api, ns), "the Deployment")
        pod = deployment["spec"]["template"]["spec"]
        assert pod["initContainers"][0]["name"] == "wait-for-model"
        assert pod["volumes"][0]["persistentVolumeClaim"] == {
            "claimName": claim["metadata"]["name"],
            "readOnly": True,
        }
        wait_for(lambda: isvc_condition(api, ns, "ModelCached").get("status") == "False", "ModelCached=False")

        stalled = condition_with_reason(api, ns, "Stalled", "DownloadFailed", timeout=240)
        assert stalled["status"] == "True"
        assert jobs[0]["metadata"]["name"] in stalled["message"]
        assert "model-download exit code 1" in stalled["message"]
        cached = isvc_condition(api, ns, "ModelCached")
        assert (cached["status"], cached["reason"]) == ("False", "DownloadFailed")
        assert isvc_condition(api, ns, "Ready")["status"] == "False"
    finally:
        api.delete(API_VERSION, ISVC, ns, "chat")
        api.delete("v1", "persistentvolumes", None, volume)


def test_a_service_port_edited_by_hand_is_put_back(api, ns, operator):
    """`kubectl edit` moves the Service's port 80 to 8080 (still named http): a plain server-side
    apply would add port 80 beside it and fail with 422 (duplicate port name) on every retry."""
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=0))
    service = wait_for(lambda: api.get("v1", "services", ns, "chat"), "the Service")
    service["spec"]["ports"][0]["port"] = 8080
    api.replace("v1", "services", ns, "chat", service)
    wait_for(
        lambda: (
            [(p["name"], p["port"]) for p in api.get("v1", "services", ns, "chat")["spec"]["ports"]]
            == [("http", 80)]
        ),
        "port 80 back",
        timeout=60,
    )
    _settle(operator)
    assert isvc_condition(api, ns, "Stalled").get("status") == "False"


def test_status_names_a_crash_loop_with_the_servers_last_words(api, ns, operator):
    """A model path that is not in the claim: the server exits at start-up, the kubelet backs off,
    and the InferenceService says which pod, and what the server said before it exited."""
    api.create(API_VERSION, ISVC, ns, manifest(ns, model={"name": "smollm2", "uri": "pvc://models/missing"}))
    waiting = condition_with_reason(api, ns, "Reconciling", "CrashLoopBackOff", timeout=180)
    assert "container server keeps crashing, last exit code" in waiting["message"]
    assert "no such checkpoint directory" in waiting["message"] and "/missing" in waiting["message"]


def test_status_names_an_oom_killed_engine_with_its_limit_and_what_to_change(api, ns, operator):
    """An engine whose pod's memory (200Mi) cannot hold even Python and torch: the kernel kills it
    in its memory cgroup (the process kubelet makes one where this machine allows), and the
    InferenceService says so, with the limit, instead of a bare crash loop."""
    if not memory_cgroups_available():
        pytest.skip("no writable memory cgroup here: the process kubelet runs containers unlimited")
    api.create(API_VERSION, ISVC, ns, manifest(ns, resources={"memory": "200Mi"}))
    waiting = condition_with_reason(api, ns, "Reconciling", "OOMKilled", timeout=180)
    assert "keeps being killed for using more than its memory limit (200Mi)" in waiting["message"]
    assert "exit code 137 (OOMKilled): raise spec.resources.memory" in waiting["message"]


CHART = Path(__file__).resolve().parents[2] / "charts" / "kvpilot"


def chart_rules() -> set[tuple[str, str, str]]:
    """(verb, apiGroup, resource) the Helm chart grants the operator, cluster-wide install."""
    rendered = helm("template", "kvp", str(CHART), "--namespace", "kvpilot-system")
    assert rendered.returncode == 0, rendered.stderr
    roles = [d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "ClusterRole"]
    return {
        (verb, group, resource)
        for role in roles
        for rule in role["rules"]
        for verb in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def resource_requests(requests: list[dict]) -> set[tuple[str, str, str]]:
    """(verb, apiGroup, resource[/subresource]) of each completed API request (not discovery's;
    a watch still open is not in the audit log yet, the list before it is)."""
    used = set()
    for request in requests:
        ref = request.get("objectRef") or {}
        if ref.get("resource"):
            resource = (
                f"{ref['resource']}/{ref['subresource']}" if ref.get("subresource") else ref["resource"]
            )
            # A server-side apply that creates is a patch, authorized as patch (and create).
            used.add((request["verb"], ref.get("apiGroup", ""), resource))
    return used


def router_config_in(api, ns: str) -> dict[str, Any]:
    config_map = api.get("v1", "configmaps", ns, "chat-router") or {"data": {"router.yaml": "{}"}}
    return yaml.safe_load(config_map["data"]["router.yaml"])


def test_router_with_tenants_answers_through_the_service_and_follows_the_engine(api, ns, operator, cluster):
    """Tenants and the upstream key from a real Secret (Stalled until it exists); router pods in
    front of the engine answer the official client through the `chat` Service's endpoints while
    the engine refuses requests around them; the router's endpoint list follows the engine pods'
    readiness; the operator used only what the chart grants."""
    key, engine_key = f"sk-{uuid.uuid4().hex}", f"sk-{uuid.uuid4().hex}"
    tenants = [{"name": "team-a", "apiKeySecretRef": {"name": "chat-keys", "key": "team-a"}}]
    router = {"enabled": True, "upstreamApiKeySecretRef": {"name": "chat-keys", "key": "engine"}}
    api.create(API_VERSION, ISVC, ns, manifest(ns, router=router, tenants=tenants))
    stalled = condition_with_reason(api, ns, "Stalled", "SecretNotFound")
    assert stalled["status"] == "True"
    assert (
        "Secret chat-keys (spec.tenants[0] (team-a), spec.router.upstreamApiKeySecretRef)"
        in stalled["message"]
    )
    keys = {"team-a": key, "engine": engine_key, "unused": "never-mounted"}
    api.create("v1", "secrets", ns, {"metadata": {"name": "chat-keys"}, "stringData": keys})
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=240)

    # The router's config lists the ready engine pod, and the tenant's key file, never the key.
    engine_ips = [
        p["status"]["podIP"]
        for p in api.list("v1", "pods", ns, labelSelector="app.kubernetes.io/name=kvpilot")
    ]
    config = wait_for(
        lambda: (
            router_config_in(api, ns)["models"][0]["revisions"][0]["endpoints"] and router_config_in(api, ns)
        ),
        "the engine endpoint in the router config",
    )
    assert config["models"][0]["revisions"] == [
        {
            "name": api.get(API_VERSION, ISVC, ns, "chat")["status"]["rollout"]["stableRevision"],
            "weight": 100,
            "endpoints": [f"http://{ip}:8000" for ip in engine_ips],
        }
    ]
    assert config["tenants"] == [{"name": "team-a", "keyFile": "/etc/kvpilot/keys/team-a"}]
    assert config["upstreamApiKeyFile"] == "/etc/kvpilot/upstream/key"
    # Around the router, the engine refuses a request without the upstream key.
    direct = httpx.get(f"http://{engine_ips[0]}:8000/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert direct.status_code == 401

    # Through the `chat` Service: its endpoints are the router pods (no kube-proxy here, so the
    # client calls each endpoint of the Service).
    slices = api.list(
        "discovery.k8s.io/v1", "endpointslices", ns, labelSelector="kubernetes.io/service-name=chat"
    )
    routers = sorted(
        a
        for s in slices
        for e in s.get("endpoints") or []
        if e["conditions"].get("ready")
        for a in e["addresses"]
    )
    router_pods = api.list("v1", "pods", ns, labelSelector="app.kubernetes.io/name=kvpilot-router")
    assert routers == sorted(p["status"]["podIP"] for p in router_pods) and len(routers) == 2
    (port,) = {p["port"] for s in slices for p in s.get("ports") or []}
    for address in routers:
        client = openai.OpenAI(
            base_url=f"http://{address}:{port}/v1", api_key=key, timeout=120, max_retries=0
        )
        completion = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
        )
        assert completion.choices[0].message.content.strip()
        assert completion.usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"http://{address}:{port}/v1", api_key="sk-wrong", max_retries=0
            ).models.list()

    # The engine scaled to zero: its endpoint leaves the router's config (EndpointSlice watch).
    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"replicas": 0}})
    wait_for(
        lambda: router_config_in(api, ns)["models"][0]["revisions"][0]["endpoints"] == [],
        "the router config to drop the engine endpoint",
        timeout=90,
    )

    # The key is nowhere the operator writes or logs; Secrets were only read one by one, by name.
    events = json.dumps(api.list("v1", "events", ns))
    written = json.dumps([api.get(API_VERSION, ISVC, ns, "chat"), api.list("v1", "configmaps", ns)])
    for secret_value in (key, engine_key):
        assert secret_value not in events and secret_value not in written
        assert secret_value not in operator.output()
    used = resource_requests(operator.requests())
    assert {("list", "discovery.k8s.io", "endpointslices"), ("patch", "", "configmaps")} <= used
    assert {verb for verb, _, resource in used if resource == "secrets"} == {"get"}
    assert used <= chart_rules(), sorted(used - chart_rules())


# The Gateway API Inference Extension's CRD as far as this test needs it (the real one is not
# available offline): the group, version, kind and plural the operator discovers and writes.
INFERENCE_POOL_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {
        "name": "inferencepools.inference.networking.k8s.io",
        # *.k8s.io groups need it; the real CRD carries this one.
        "annotations": {
            "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api-inference-extension/pull/1173"
        },
    },
    "spec": {
        "group": "inference.networking.k8s.io",
        "scope": "Namespaced",
        "names": {
            "kind": "InferencePool",
            "listKind": "InferencePoolList",
            "plural": "inferencepools",
            "singular": "inferencepool",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


def test_inference_pool_is_rendered_only_where_its_crd_is_served(cluster, api, ns, kubectl):
    """Without the CRD the spec's inferencePool is ignored (Ready all the same); with it, a fresh
    operator writes the pool, and deletes it when the spec stops asking."""
    api.create(
        API_VERSION, ISVC, ns, manifest(ns, replicas=0, router={"enabled": False, "inferencePool": True})
    )
    with OperatorProcess(cluster.control_plane):
        wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready without the CRD")
    kubectl.apply("-f", "-", stdin=json.dumps(INFERENCE_POOL_CRD))
    try:
        kubectl.run("wait", "--for=condition=Established", "crd/inferencepools.inference.networking.k8s.io")
        with OperatorProcess(cluster.control_plane):  # a fresh operator discovers the CRD
            pool = wait_for(
                lambda: api.get("inference.networking.k8s.io/v1", "inferencepools", ns, "chat"), "the pool"
            )
            assert pool["spec"] == {
                "selector": {
                    "matchLabels": {"app.kubernetes.io/name": "kvpilot", "app.kubernetes.io/instance": "chat"}
                },
                "targetPorts": [{"number": 8000}],
                "endpointPickerRef": {"name": "chat-epp", "port": {"number": 9002}},
            }
            assert pool["metadata"]["ownerReferences"][0]["kind"] == KIND
            api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"router": {"inferencePool": False}}})
            wait_for(
                lambda: api.get("inference.networking.k8s.io/v1", "inferencepools", ns, "chat") is None,
                "the pool to be deleted",
            )
    finally:
        kubectl.run("delete", "crd", "inferencepools.inference.networking.k8s.io", "--wait=false")
