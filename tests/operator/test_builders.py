"""Pure builders: plain dict assertions, and every object validated with kubernetes-validate --strict."""

from typing import Any

import kubernetes_validate
import pytest
from kvpilot.operator.api import InferenceService
from kvpilot.operator.builders import (
    build_children,
    build_deployment,
    build_pod_disruption_budget,
    build_service,
    build_service_account,
    serve_args,
)
from kvpilot.operator.labels import SPEC_HASH_ANNOTATION, spec_hash
from kvpilot.operator.revision import revision_hash

K8S_VERSIONS = ["1.29.0", "1.33.0", "1.37.0"]  # oldest claimed, image volumes GA-ish, newest known
UID = "1c0ffee0-0000-4000-8000-000000000001"


def isvc(name: str = "chat", uid: str | None = UID, **spec: Any) -> InferenceService:
    base = {
        "model": {"name": "smollm2", "uri": "pvc://models/smollm2"},
        "engine": {"quantization": "int4", "kvCacheDtype": "int8", "maxModelLen": 4096},
        "resources": {"gpu": {"count": 1}, "memory": "16Gi"},
        "replicas": 2,
    }
    base.update(spec)
    metadata = {"name": name, "namespace": "team-a", "uid": uid, "generation": 3}
    return InferenceService.from_body({"metadata": metadata, "spec": base})


TENANTS = [
    {"name": "team-a", "apiKeySecretRef": {"name": "router-keys", "key": "team-a"}, "models": ["smollm2"],
     "requestsPerMinute": 600, "tokensPerMinute": 200000},
    {"name": "team-b", "apiKeySecretRef": {"name": "team-b-key", "key": "api-key"}},
]  # fmt: skip


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_deployment_runs_kvpilot_serve_with_the_spec():
    deployment = build_deployment(isvc())
    server = container(deployment)
    assert server["command"] == ["kvpilot", "serve"]
    assert server["args"] == [
        "--model", "/mnt/models/smollm2",
        "--served-model-name", "smollm2",
        "--host", "0.0.0.0",
        "--port", "8000",
        "--max-model-len", "4096",
        "--gpu-memory-utilization", "0.9",  # a GPU replica: the server's default, spelled out
        "--enable-prefix-caching",
        "--dtype", "auto",  # a GPU replica: the checkpoint's bf16/fp16, not float32
        "--quantization", "int4",
        "--kv-cache-dtype", "int8",
        "--tensor-parallel-size", "1",
        "--shutdown-timeout", "30",  # spec.engine.drainTimeout's default
    ]  # fmt: skip
    assert server["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert server["resources"] == {
        "requests": {"memory": "16Gi"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"},
    }
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = server["startupProbe"]
    assert startup["httpGet"] == {"path": "/ready", "port": "http"}  # loaded and warmed up, not just alive
    assert startup["periodSeconds"] * startup["failureThreshold"] == 1800  # spec.engine.loadTimeout 30m
    assert server["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert server["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert server["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 10  # preStop + drain + the exit
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532  # the image's user (Dockerfile)
    assert pod["volumes"] == [
        {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True} in server["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }


def test_labels_selector_and_owner_reference():
    deployment = build_deployment(isvc())
    revision = revision_hash(isvc().spec)
    assert deployment["metadata"]["name"] == f"chat-{revision}"  # one Deployment per revision
    labels = {
        "app.kubernetes.io/name": "kvpilot",
        "app.kubernetes.io/instance": "chat",
        "app.kubernetes.io/component": "inference-server",
        "app.kubernetes.io/managed-by": "kvpilot-operator",
        "kvpilot.dev/revision": revision,
    }
    assert deployment["metadata"]["labels"] == labels
    assert deployment["spec"]["selector"] == {
        "matchLabels": {
            "app.kubernetes.io/name": "kvpilot",
            "app.kubernetes.io/instance": "chat",
            "kvpilot.dev/revision": revision,
        }
    }
    # The Service and the PDB select every revision's pods.
    service = next(c for c in build_children(isvc()) if c["kind"] == "Service")
    assert "kvpilot.dev/revision" not in service["spec"]["selector"]
    assert deployment["spec"]["template"]["metadata"]["labels"] == labels
    assert deployment["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "kvpilot.dev/v1alpha1",
            "kind": "InferenceService",
            "name": "chat",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert "ownerReferences" not in build_deployment(isvc(uid=None))["metadata"]  # `kvpilot render`


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ({}, {"--quantization": "none", "--kv-cache-dtype": "auto", "--max-model-len": None}),
        (
            {"maxNumSeqs": 64, "maxNumBatchedTokens": 2048},
            {"--max-num-seqs": "64", "--max-num-batched-tokens": "2048"},
        ),
        ({"enablePrefixCaching": False}, {"--enable-prefix-caching": None}),
        (
            {"quantization": "fp8", "kvCacheDtype": "fp8"},
            {"--quantization": "fp8", "--kv-cache-dtype": "fp8"},
        ),
        ({"tensorParallelSize": 1}, {"--tensor-parallel-size": "1"}),
        (
            {"dtype": "bfloat16", "gpuMemoryUtilization": 0.85, "kvCacheMemory": "20Gi"},
            {"--dtype": "bfloat16", "--gpu-memory-utilization": "0.85", "--kv-cache-memory": str(20 << 30)},
        ),
        ({"kvCacheMemory": "1500M"}, {"--kv-cache-memory": "1500000000"}),
        ({"drainTimeout": "10m"}, {"--shutdown-timeout": "600"}),
        ({"drainTimeout": "1m30s"}, {"--shutdown-timeout": "90"}),
    ],
)
def test_serve_args_table(engine, expected):
    args = serve_args(isvc(engine=engine), "/mnt/models")
    for name, value in expected.items():
        assert flag(args, name) == value if value is not None else name not in args
    if engine.get("enablePrefixCaching") is False:
        assert "--no-enable-prefix-caching" in args


def test_a_cpu_replica_leaves_dtype_and_gpu_share_to_the_server_unless_set():
    cpu = {"gpu": {"count": 0}}
    args = serve_args(isvc(resources=cpu), "/mnt/models")
    assert "--dtype" not in args and "--gpu-memory-utilization" not in args
    args = serve_args(isvc(resources=cpu, engine={"dtype": "bfloat16"}), "/mnt/models")
    assert flag(args, "--dtype") == "bfloat16"


@pytest.mark.parametrize(
    ("engine", "failures", "grace"),
    [
        ({}, 900, 45),
        ({"loadTimeout": "1h", "drainTimeout": "10m"}, 1800, 615),
        ({"loadTimeout": "95s"}, 48, 45),
    ],
)
def test_load_and_drain_timeouts_bound_the_probes_and_the_grace_period(engine, failures, grace):
    pod = build_deployment(isvc(engine=engine))["spec"]["template"]["spec"]
    assert pod["containers"][0]["startupProbe"]["failureThreshold"] == failures
    assert pod["containers"][0]["startupProbe"]["periodSeconds"] == 2
    assert pod["terminationGracePeriodSeconds"] == grace


def test_extra_args_come_last():
    args = serve_args(isvc(engine={"extraArgs": ["--max-queue-len", "8"]}), "/mnt/models")
    assert flag(args, "--tensor-parallel-size") == "1"
    assert args[-2:] == ["--max-queue-len", "8"]


@pytest.mark.parametrize(
    ("uri", "volume", "model_path", "init_command"),
    [
        (
            "pvc://models",
            {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
            "/mnt/models",
            None,
        ),
        (
            "oci://ghcr.io/acme/smollm2:1",
            {"image": {"reference": "ghcr.io/acme/smollm2:1", "pullPolicy": "IfNotPresent"}},
            "/mnt/models",
            None,
        ),
        (
            "hf://org/repo@v2",
            {"emptyDir": {}},
            "/mnt/models",
            ["hf", "download", "org/repo", "--revision", "v2", "--local-dir", "/mnt/models"],
        ),
        (
            "s3://bucket/models/x",
            {"emptyDir": {}},
            "/mnt/models",
            ["aws", "s3", "sync", "s3://bucket/models/x", "/mnt/models"],
        ),
        (
            "gs://bucket/x",
            {"emptyDir": {}},
            "/mnt/models",
            ["gcloud", "storage", "rsync", "--recursive", "gs://bucket/x", "/mnt/models"],
        ),
    ],
)
def test_model_sources(uri, volume, model_path, init_command):
    deployment = build_deployment(isvc(model={"name": "m", "uri": uri}))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {"name": "model", **volume}
    assert flag(container(deployment)["args"], "--model") == model_path
    if init_command is None:
        assert "initContainers" not in pod
    else:
        (init,) = pod["initContainers"]
        assert init["command"] == init_command
        assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_scheduling_env_and_pod_metadata():
    spec = {
        "scheduling": {
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "inference",
            "runtimeClassName": "nvidia",
            "affinity": {"nodeAffinity": {}},
        },
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        "imagePullSecrets": [{"name": "regcred"}],
        "podLabels": {"team": "a"},
        "podAnnotations": {"sidecar.istio.io/inject": "false"},
        "serviceAccountName": "reader",
    }
    deployment = build_deployment(isvc(**spec))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (pod["priorityClassName"], pod["runtimeClassName"]) == ("inference", "nvidia")
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "reader"
    assert container(deployment)["env"][-1] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }
    template = deployment["spec"]["template"]["metadata"]
    assert template["labels"]["team"] == "a"
    assert template["annotations"]["sidecar.istio.io/inject"] == "false"


def test_service_pdb_and_service_account():
    assert build_service(isvc())["spec"] == {
        "type": "ClusterIP",
        "selector": {"app.kubernetes.io/name": "kvpilot", "app.kubernetes.io/instance": "chat"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
    }
    assert build_pod_disruption_budget(isvc())["spec"] == {
        "maxUnavailable": 1,
        "selector": {
            "matchLabels": {"app.kubernetes.io/name": "kvpilot", "app.kubernetes.io/instance": "chat"}
        },
    }
    account = build_service_account(
        isvc(createServiceAccount=True, serviceAccountAnnotations={"iam": "role"})
    )
    assert account["metadata"]["name"] == "chat"
    assert account["metadata"]["annotations"] == {"iam": "role"}


ROUTER = ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]  # the router's, after the engine's


@pytest.mark.parametrize(
    ("spec", "kinds"),
    [
        ({}, ["Deployment", "Service", "PodDisruptionBudget", *ROUTER]),
        ({"replicas": 1}, ["Deployment", "Service", *ROUTER]),
        ({"replicas": 0}, ["Deployment", "Service", *ROUTER]),
        (
            {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "target": 0.7}},
            ["Deployment", "Service", "PodDisruptionBudget", *ROUTER],
        ),
        (
            {"autoscaling": {"minReplicas": 1, "maxReplicas": 1, "target": 0.7}},
            ["Deployment", "Service", *ROUTER],
        ),
        (
            {"createServiceAccount": True},
            ["ServiceAccount", "Deployment", "Service", "PodDisruptionBudget", *ROUTER],
        ),
        ({"router": {"replicas": 1}}, ["Deployment", "Service", "PodDisruptionBudget", *ROUTER[:3]]),
        ({"router": {"enabled": False}}, ["Deployment", "Service", "PodDisruptionBudget"]),
        (
            {"router": {"enabled": False, "inferencePool": True}},
            ["Deployment", "Service", "PodDisruptionBudget", "InferencePool"],
        ),
        (
            {"router": {"inferencePool": True}},
            ["Deployment", "Service", "PodDisruptionBudget", *ROUTER, "InferencePool"],
        ),
    ],
)
def test_children_table(spec, kinds):
    assert [child["kind"] for child in build_children(isvc(**spec))] == kinds


def test_spec_hash_is_stable_and_follows_the_spec():
    first, again = build_children(isvc()), build_children(isvc())
    assert first == again
    hashes = [child["metadata"]["annotations"][SPEC_HASH_ANNOTATION] for child in first]
    assert hashes == [spec_hash(child) for child in first]
    changed = build_children(isvc(engine={"maxModelLen": 8192}))
    assert changed[0]["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != hashes[0]  # Deployment
    assert changed[1]["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == hashes[1]  # Service


ALL_SPECS = [
    {},
    {
        "tenants": TENANTS,
        "router": {
            "replicas": 3,
            "balancing": "least-request",
            "inferencePool": True,
            "upstreamApiKeySecretRef": {"name": "engine-key", "key": "key"},
        },
    },
    {"router": {"enabled": False}},
    {"replicas": 1, "resources": {"cpu": 4, "memory": "8Gi", "sharedMemory": "512Mi"}},
    {
        "model": {"name": "q", "uri": "hf://Qwen/Qwen2.5-7B-Instruct", "revision": "main"},
        "createServiceAccount": True,
    },
    {"model": {"name": "q", "uri": "s3://bucket/q"}, "scheduling": {"tolerations": [{"operator": "Exists"}]}},
    {"model": {"name": "q", "uri": "gs://bucket/q"}, "env": [{"name": "A", "value": "1"}]},
    {"model": {"name": "q", "uri": "hf://Qwen/Qwen3-32B", "cache": {"size": "80Gi", "storageClassName": ""}}},
    {"model": {"name": "q", "uri": "s3://bucket/q", "size": "20Gi"}},
]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=range(len(ALL_SPECS)))
def test_children_pass_kubernetes_validate_strict(spec, version):
    for child in build_children(isvc(**spec)):
        if child["kind"] != "InferencePool":  # a CRD's kind: kubernetes-validate knows core kinds only
            kubernetes_validate.validate(child, version, strict=True)


@pytest.mark.parametrize("version", ["1.33.0", "1.37.0"])
def test_oci_image_volume_needs_kubernetes_1_33(version):
    deployment = build_deployment(isvc(model={"name": "m", "uri": "oci://ghcr.io/acme/smollm2:1"}))
    kubernetes_validate.validate(deployment, version, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.29.0", strict=True)


def test_with_autoscaling_the_deployment_leaves_replicas_to_the_autoscaler():
    autoscaled = isvc(replicas=3, autoscaling={"minReplicas": 2, "maxReplicas": 4, "target": 0.7})
    assert "replicas" not in build_deployment(autoscaled)["spec"]
    assert build_deployment(isvc(replicas=3))["spec"]["replicas"] == 3
