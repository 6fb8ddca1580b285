"""Model delivery builders, the download's status, why pods wait, and the planner's new rows."""

from typing import Any

import pytest
from kvpilot.operator.api import RolloutStatus
from kvpilot.operator.builders import build_children, build_deployment
from kvpilot.operator.model_cache import COMPLETE_MARKER, cache_key, claim_name, job_name
from kvpilot.operator.planner import list_reset, plan
from kvpilot.operator.pod_status import pod_problem
from kvpilot.operator.revision import revision_deployment_name, revision_hash
from kvpilot.operator.status import RolloutReport, compute_status

from tests.operator.test_builders import isvc

HF = {"name": "llama", "uri": "hf://meta-llama/Meta-Llama-3-8B@v1"}
CACHE = {"storageClassName": "fast", "size": "40Gi", "accessMode": "ReadWriteMany"}
NOW = "2026-12-01T12:00:00Z"


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def engine_deployment(service) -> str:
    return revision_deployment_name(service, revision_hash(service.spec))


def test_a_revision_still_running_keeps_its_claim_and_download_job():
    old = isvc(model={**HF, "cache": CACHE})
    new = isvc(model={**HF, "uri": "hf://meta-llama/Meta-Llama-3-8B@v2", "cache": CACHE})
    names = {(c["kind"], c["metadata"]["name"]) for c in build_children(new, kept_revisions=[old, new])}
    for service in (old, new):
        assert ("Job", job_name(service)) in names and ("PersistentVolumeClaim", claim_name(service)) in names
    assert job_name(old) != job_name(new)
    alone = {(c["kind"], c["metadata"]["name"]) for c in build_children(new)}
    assert ("Job", job_name(old)) not in alone


def test_cache_builds_a_claim_a_download_job_and_read_only_engine_pods():
    service = isvc(model={**HF, "cache": CACHE})
    children = {(c["kind"], c["metadata"]["name"]): c for c in build_children(service)}
    key = cache_key(service)
    claim = children["PersistentVolumeClaim", f"chat-model-{key}"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "40Gi"}},
        "storageClassName": "fast",
    }
    job = children["Job", f"chat-download-{key}"]
    template = job["spec"]["template"]
    assert (
        template["metadata"]["labels"]["app.kubernetes.io/name"] == "kvpilot-model-download"
    )  # not the Service's
    assert template["spec"]["restartPolicy"] == "Never"
    (download,) = template["spec"]["initContainers"]
    assert download["command"] == [
        "hf", "download", "meta-llama/Meta-Llama-3-8B", "--revision", "v1", "--local-dir", "/mnt/models",
    ]  # fmt: skip
    (mark,) = template["spec"]["containers"]
    assert mark["command"][-2:] == [COMPLETE_MARKER, "hf://meta-llama/Meta-Llama-3-8B@v1"]
    assert template["spec"]["volumes"][0] == {
        "name": "model",
        "persistentVolumeClaim": {"claimName": claim_name(service)},
    }

    pod = pod_spec(children["Deployment", engine_deployment(service)])
    assert pod["volumes"][0] == {
        "name": "model",
        "persistentVolumeClaim": {"claimName": claim_name(service), "readOnly": True},
    }
    (wait,) = pod["initContainers"]
    assert wait["command"][-2:] == [COMPLETE_MARKER, "5"]
    assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True} in pod["containers"][0][
        "volumeMounts"
    ]


def test_the_cache_key_follows_model_and_revision_only():
    one = isvc(model={**HF, "cache": CACHE})
    assert cache_key(one) == cache_key(isvc(model={**HF, "cache": {**CACHE, "size": "80Gi"}}))
    assert cache_key(one) != cache_key(
        isvc(model={**HF, "uri": "hf://meta-llama/Meta-Llama-3-8B@v2", "cache": CACHE})
    )
    assert job_name(one).startswith("chat-download-")


def test_without_cache_the_per_pod_download_is_bounded_by_model_size():
    pod = pod_spec(build_deployment(isvc(model={**HF, "size": "20Gi"})))
    assert pod["volumes"][0] == {"name": "model", "emptyDir": {"sizeLimit": "20Gi"}}
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "20Gi"
    assert pod["initContainers"][0]["name"] == "model-download"
    unbounded = pod_spec(build_deployment(isvc(model=HF)))
    assert unbounded["volumes"][0] == {"name": "model", "emptyDir": {}}
    assert "ephemeral-storage" not in unbounded["containers"][0]["resources"].get("requests", {})


def test_cache_is_rejected_for_models_that_are_not_downloaded():
    with pytest.raises(ValueError, match=r"spec\.model\.cache applies to hf://"):
        isvc(model={"name": "m", "uri": "pvc://models/m", "cache": CACHE})


def job(conditions: list[dict[str, Any]] | None = None, failed: int = 0) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat-download-x"},
        "status": {"conditions": conditions or [], "failed": failed},
    }


def pod(name: str, app: str = "kvpilot", **status: Any) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": app, "app.kubernetes.io/instance": "chat"}
    spec = {"containers": [{"name": "server", "resources": {"limits": {"memory": "1Gi"}}}]}
    return {
        "metadata": {"name": name, "labels": labels, "creationTimestamp": NOW},
        "spec": spec,
        "status": status,
    }


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


WAITING_DEPLOYMENT = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "replicas": 2}}


@pytest.mark.parametrize(
    ("the_job", "pods", "stalled", "reason", "cached", "message_part"),
    [
        (None, [], "False", "CreatingJob", "False", "does not exist yet"),
        (job(failed=1), [], "False", "Downloading", "False", "1 failed attempts"),
        (job([{"type": "Complete", "status": "True"}]), [], "False", "WaitingForReplicas", "True", "0/2"),
        (
            job([{"type": "Failed", "status": "True", "message": "Job has reached the backoff limit"}]),
            [pod("chat-download-x-1", "kvpilot-model-download", initContainerStatuses=[
                {"name": "model-download", "state": {"terminated": {"exitCode": 1, "reason": "Error",
                 "message": "Fetching...\nRepository Not Found for url: https://huggingface.co/x\n"}}}])],
            "True", "DownloadFailed", "False",
            "backoff limit; model-download exit code 1 (Error): Repository Not Found for url: https://huggingface.co/x",
        ),
    ],
)  # fmt: skip
def test_download_progress_and_failure_in_status(the_job, pods, stalled, reason, cached, message_part):
    service = isvc(model={**HF, "cache": CACHE})
    status = compute_status(service, WAITING_DEPLOYMENT, {}, NOW, pods=pods, job=the_job)
    found = conditions(status)
    assert found["Stalled"][:2] == (stalled, reason)
    assert found["ModelCached"][0] == cached
    assert message_part in found["Ready"][2]


@pytest.mark.parametrize(
    ("status", "reason", "message"),
    [
        (
            {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                             "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]},
            "Unschedulable",
            "pod chat-1 cannot be scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        ),
        (
            {"containerStatuses": [{"name": "server", "image": "kvpilot:nope", "state": {
                "waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]},
            "ImagePullError",
            "pod chat-1 container server: ImagePullBackOff: Back-off pulling image",
        ),
        (
            {"containerStatuses": [{"name": "server", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                                                 "message": "no config.json"}}}]},
            "CrashLoopBackOff",
            "pod chat-1 container server keeps crashing, last exit code 1 (Error): no config.json",
        ),
        (
            {"containerStatuses": [{"name": "server", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                    "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                                                 "message": "INFO: Started"}}}]},
            "OOMKilled",
            "pod chat-1 container server keeps being killed for using more than its memory limit (1Gi), last "
            "exit code 137 (OOMKilled): raise spec.resources.memory, or use less (spec.engine.quantization, "
            "spec.engine.kvCacheMemory, spec.engine.maxNumSeqs)",
        ),
        ({"containerStatuses": [{"name": "server", "state": {"running": {}}}]}, None, None),
    ],
)  # fmt: skip
def test_why_pods_wait(status, reason, message):
    problem = pod_problem([pod("chat-1", **status)])
    assert problem == (None if reason is None else (reason, message))
    if reason is not None:  # and the InferenceService's status says so while replicas wait
        found = conditions(
            compute_status(isvc(), WAITING_DEPLOYMENT, {}, NOW, pods=[pod("chat-1", **status)])
        )
        assert found["Reconciling"] == ("True", reason, message)
        assert found["Ready"] == ("False", reason, message)


def test_during_a_rollout_the_reason_stays_the_rollouts_and_names_a_pod_that_cannot_start():
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    waiting = pod(
        "chat-1", conditions=[{**scheduled, "message": "0/1 nodes are available: 1 Insufficient cpu."}]
    )
    rollout = RolloutStatus(
        phase="Progressing", revision="new", stable_revision="old", message="1/2 new replicas ready"
    )
    report = RolloutReport(rollout=rollout, revisions=[], replicas=3, ready_replicas=2, desired=2)
    found = conditions(compute_status(isvc(), WAITING_DEPLOYMENT, {}, NOW, None, (), report, pods=[waiting]))
    assert found["Reconciling"][:2] == ("True", "RolloutProgressing")
    assert found["Reconciling"][2].startswith("1/2 new replicas ready; pod chat-1 cannot be scheduled: 0/1")


def service(ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "chat", "namespace": "a"},
        "spec": {"ports": ports},
    }


@pytest.mark.parametrize(
    ("observed_ports", "reset"),
    [
        ([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 9999}], False),  # same key
        ([{"name": "http", "port": 8080, "protocol": "TCP", "targetPort": "http"}], True),  # re-keyed by hand
        ([{"name": "http", "port": 80}, {"name": "debug", "port": 81}], True),  # an extra entry
    ],
)  # fmt: skip
def test_a_hand_edited_service_port_list_is_replaced_before_the_apply(observed_ports, reset):
    desired = service([{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}])
    patch = list_reset(desired, service(observed_ports))
    assert (patch is not None) is reset
    if reset:
        assert patch["spec"] == {"ports": desired["spec"]["ports"]}
        assert plan([desired], [service(observed_ports)]).reset == [patch]


def test_a_download_job_is_never_updated():
    desired = [c for c in build_children(isvc(model={**HF, "cache": CACHE})) if c["kind"] == "Job"]
    changed = [{**desired[0], "spec": {"backoffLimit": 9}}]
    assert plan(desired, changed).update == []


def test_the_wait_container_finishes_once_the_job_marks_the_download_complete(tmp_path):
    """The two helper commands as the pods run them (the image's python), on a local directory."""
    import subprocess
    import sys

    service = isvc(model={**HF, "cache": CACHE})
    children = {(c["kind"], c["metadata"]["name"]): c for c in build_children(service)}
    (mark,) = children["Job", job_name(service)]["spec"]["template"]["spec"]["containers"]
    (wait,) = pod_spec(children["Deployment", engine_deployment(service)])["initContainers"]

    def local(argv: list[str]) -> list[str]:
        argv = [sys.executable if a == "python" else a.replace("/mnt/models", str(tmp_path)) for a in argv]
        return [*argv[:-1], "0.1"] if argv[-1] == "5" else argv  # poll faster than the pods' 5 s

    waiting = subprocess.Popen(local(wait["command"]), stdout=subprocess.PIPE, text=True)
    try:
        assert waiting.stdout.readline().startswith("waiting for the model download Job")
        assert waiting.poll() is None
        subprocess.run(local(mark["command"]), check=True)
        assert waiting.wait(timeout=30) == 0
    finally:
        waiting.kill()
    assert (tmp_path / ".kvpilot-download-complete").read_text() == "hf://meta-llama/Meta-Llama-3-8B@v1\n"


def test_a_longest_name_still_gives_a_download_job_name_that_fits_a_label():
    """The Job controller copies a Job's name into its pods' `job-name` label (63 characters)."""
    long_a, long_b = "a" * 55 + "x", "a" * 55 + "y"  # the CRD's longest names, alike but the last
    jobs = [job_name(isvc(name, model={**HF, "cache": CACHE})) for name in (long_a, long_b)]
    assert all(len(job) <= 63 for job in jobs) and jobs[0] != jobs[1]
    cached = isvc(model={**HF, "cache": CACHE})
    assert job_name(cached) == f"chat-download-{cache_key(cached)}"  # short names keep their Job's


def test_the_download_job_runs_as_the_service_account_the_operator_creates():
    """An s3:// or gs:// download is the pod that needs the cloud identity (e.g. IRSA)."""
    s3 = {"name": "m", "uri": "s3://bucket/m", "cache": {"size": "10Gi"}}
    service = isvc(
        model=s3, createServiceAccount=True, serviceAccountAnnotations={"eks.amazonaws.com/role-arn": "r"}
    )
    children = {(child["kind"], child["metadata"]["name"]): child for child in build_children(service)}
    assert ("ServiceAccount", "chat") in children
    assert pod_spec(children["Job", job_name(service)])["serviceAccountName"] == "chat"
    assert pod_spec(children["Deployment", engine_deployment(service)])["serviceAccountName"] == "chat"


@pytest.mark.parametrize("name", ["HOME", "HF_HOME", "CLOUDSDK_CONFIG"])
def test_an_env_entry_named_like_the_operators_replaces_it(name):
    """Server-side apply rejects a container whose env lists one name twice."""
    gs = {"name": "m", "uri": "gs://bucket/m", "cache": {"size": "10Gi"}}
    service = isvc(model=gs, env=[{"name": name, "value": "/mine"}])
    children = {child["metadata"]["name"]: child for child in build_children(service)}
    containers = [
        container
        for child in (children[engine_deployment(service)], children[job_name(service)])
        for container in pod_spec(child).get("initContainers", []) + pod_spec(child)["containers"]
        if container.get("env")
    ]
    assert {c["name"] for c in containers} >= {"server", "model-download"}
    for container in containers:
        names = [env["name"] for env in container["env"]]
        assert len(names) == len(set(names)), (container["name"], names)
        assert {"name": name, "value": "/mine"} in container["env"] or name == "CLOUDSDK_CONFIG"
