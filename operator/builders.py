"""Pure builders: InferenceService -> the child objects it reconciles into (plain dicts).

No client calls, no globals: each function maps a parsed InferenceService to one object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kubernetes.utils.quantity import parse_quantity
from kvpilot.operator.api import InferenceService
from kvpilot.operator.api.validation import duration_seconds
from kvpilot.operator.autoscaler.external import build_external_autoscaler
from kvpilot.operator.containers import cluster_ip_service, http_probe, pod_security_context, security_context
from kvpilot.operator.labels import (
    REVISION_LABEL,
    bounded_name,
    child_metadata,
    common_labels,
    engine_service_name,
    revision_selector,
    selector_labels,
    service_account_name,
    with_spec_hash,
)
from kvpilot.operator.model_cache import (
    MODEL_DIR,
    base_env,
    build_cache_children,
    is_downloaded,
    model_source,
    server_image,
)
from kvpilot.operator.revision import revision_deployment_name, revision_hash
from kvpilot.operator.router_builders import build_inference_pool, build_router_children
from kvpilot.operator.router_config import RevisionEndpoints, revision_endpoints
from kvpilot.serving.contract import (
    DEFAULT_PORT,
    HEALTH_PATH,
    METRICS_PATH,
    PORT_NAME,
    READY_PATH,
    SERVE_SETTING,
    SERVE_SETTINGS,
    TERMINATION_LOG,
    ServeSetting,
)

# A GPU replica's dtype unless the spec sets one: the checkpoint's (bf16/fp16), never float32.
GPU_DEFAULT_DTYPE = "auto"

# spec.engine fields whose CRD form (a quantity, a duration) is not the server flag's.
_FLAG_VALUE = {
    "kv_cache_memory": lambda quantity: int(parse_quantity(quantity)),
    "drain_timeout": lambda duration: f"{duration_seconds(duration):g}",
}

CONTAINER_NAME = "server"
PRESTOP_SLEEP_SECONDS = 5  # endpoints controllers and proxies stop sending before the drain starts
# After preStop and the drain (spec.engine.drainTimeout), the server's own exit gets this long.
EXIT_GRACE_SECONDS = 10
# How soon a loaded server counts as started (then Ready): the default model loads in ~5 s, so a
# 10 s period left a new pod, and a scale from zero's first request, waiting up to 10 s more.
STARTUP_PROBE_PERIOD_SECONDS = 2
PROGRESS_DEADLINE_SECONDS = 2400


def service_url(isvc: InferenceService) -> str:
    return f"http://{isvc.metadata.name}.{isvc.metadata.namespace}.svc.cluster.local"


def _engine_value(isvc: InferenceService, setting: ServeSetting) -> Any:
    """The spec.engine value of a setting as the server flag takes it; a GPU replica gets
    `--dtype auto` and the default `--gpu-memory-utilization` spelled out."""
    if not setting.crd_field:
        return None
    value = getattr(isvc.spec.engine, setting.crd_field)
    if value is None and isvc.spec.resources.gpu.count:
        value = {"dtype": GPU_DEFAULT_DTYPE, "gpu_memory_utilization": setting.default}.get(setting.crd_field)
    if value is not None and setting.crd_field in _FLAG_VALUE:
        value = _FLAG_VALUE[setting.crd_field](value)
    return value


def serve_args(isvc: InferenceService, model_path: str) -> list[str]:
    """`kvpilot serve` arguments: what the operator decides, then every setting the spec's engine
    carries (`ServeSetting.crd_field`, unset ones left to the server's defaults), then extraArgs."""
    fixed = {
        "model": model_path,
        "served_model_name": isvc.spec.model.name,
        "host": "0.0.0.0",
        "port": DEFAULT_PORT,
    }
    args = [part for name, value in fixed.items() for part in (SERVE_SETTING[name].flag, str(value))]
    for setting in SERVE_SETTINGS:
        value = _engine_value(isvc, setting)
        if isinstance(value, bool):
            args.append(setting.flag if value else setting.negative_flag)
        elif value is not None:
            args += [setting.flag, str(value)]
    return args + list(isvc.spec.engine.extra_args)


def _server_env(isvc: InferenceService) -> list[dict[str, Any]]:
    """The server's environment: with an upstream key, `--api-key` from the Secret (the operator
    never reads it; the kubelet resolves the reference)."""
    upstream = isvc.spec.router.upstream_api_key_secret_ref
    if upstream is None:
        return base_env(isvc)
    key = {"secretKeyRef": {"name": upstream.name, "key": upstream.key}}
    return base_env(isvc, {"name": SERVE_SETTING["api_key"].env, "valueFrom": key})


def _resources(isvc: InferenceService) -> dict[str, Any]:
    spec = isvc.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.cpu is not None:
        requests["cpu"] = spec.cpu
    if spec.memory is not None:
        requests["memory"] = limits["memory"] = spec.memory
    if spec.gpu.count:
        limits[spec.gpu.resource_name] = str(spec.gpu.count)
    model = isvc.spec.model
    if model.size is not None and model.cache is None and is_downloaded(isvc):
        requests["ephemeral-storage"] = model.size  # the per-pod download lands on the node's disk
    return {k: v for k, v in {"requests": requests, "limits": limits}.items() if v}


def termination_grace_seconds(isvc: InferenceService) -> int:
    drain = duration_seconds(isvc.spec.engine.drain_timeout)
    return PRESTOP_SLEEP_SECONDS + math.ceil(drain) + EXIT_GRACE_SECONDS


def startup_probe_failures(isvc: InferenceService) -> int:
    """failureThreshold x periodSeconds = spec.engine.loadTimeout: a hung load is restarted."""
    return max(1, math.ceil(duration_seconds(isvc.spec.engine.load_timeout) / STARTUP_PROBE_PERIOD_SECONDS))


def _pod_spec(isvc: InferenceService) -> dict[str, Any]:
    spec = isvc.spec
    model_volume, model_path, init_containers = model_source(isvc)
    model_mount = {"name": "model", "mountPath": MODEL_DIR}
    if "emptyDir" not in model_volume:
        model_mount["readOnly"] = True
    container = {
        "name": CONTAINER_NAME,
        "image": server_image(isvc),
        "imagePullPolicy": "IfNotPresent",
        "command": ["kvpilot", "serve"],
        "args": serve_args(isvc, model_path),
        "ports": [{"name": PORT_NAME, "containerPort": DEFAULT_PORT, "protocol": "TCP"}],
        "env": _server_env(isvc),
        "resources": _resources(isvc),
        "volumeMounts": [
            model_mount,
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "readinessProbe": http_probe(READY_PATH, period=5, failures=3, timeout=2),
        "livenessProbe": http_probe(HEALTH_PATH, period=10, failures=6, timeout=5),
        # /ready answers only once the model is loaded and warmed up: the startup probe bounds loading.
        "startupProbe": http_probe(
            READY_PATH, period=STARTUP_PROBE_PERIOD_SECONDS, failures=startup_probe_failures(isvc), timeout=5
        ),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_SECONDS)]}}},
        "securityContext": security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(isvc),
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            model_volume,
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if init_containers:
        pod["initContainers"] = init_containers
    account = service_account_name(isvc)
    scheduling = spec.scheduling
    optional = {
        "serviceAccountName": account,
        "imagePullSecrets": [ref.model_dump(by_alias=True) for ref in spec.image_pull_secrets],
        "nodeSelector": dict(scheduling.node_selector),
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in scheduling.tolerations],
        "affinity": scheduling.affinity,
        "priorityClassName": scheduling.priority_class_name,
        "runtimeClassName": scheduling.runtime_class_name,
    }
    pod.update({k: v for k, v in optional.items() if v})
    return pod


SPEC_REPLICAS = "spec"  # replicas as the spec says (spec.replicas, or none with autoscaling)


def build_deployment(
    isvc: InferenceService, revision: str | None = None, replicas: int | str | None = SPEC_REPLICAS
) -> dict[str, Any]:
    """The Deployment of one revision, `<name>-<revision>` (default: the spec's own revision)."""
    revision = revision or revision_hash(isvc.spec)
    if replicas == SPEC_REPLICAS:
        replicas = isvc.spec.managed_replicas
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(DEFAULT_PORT),
        "prometheus.io/path": METRICS_PATH,
        **isvc.spec.pod_annotations,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(
            isvc,
            name=revision_deployment_name(isvc, revision),
            labels={**common_labels(isvc), REVISION_LABEL: revision},
        ),
        "spec": {
            **({} if replicas is None else {"replicas": replicas}),
            "selector": {"matchLabels": revision_selector(isvc, revision)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 5,
            "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
            "template": {
                "metadata": {
                    "labels": {**isvc.spec.pod_labels, **common_labels(isvc), REVISION_LABEL: revision},
                    "annotations": annotations,
                },
                "spec": _pod_spec(isvc),
            },
        },
    }


def build_service(isvc: InferenceService) -> dict[str, Any]:
    """The engine pods' Service (`engine_service_name`: `<name>` itself when there is no router)."""
    return cluster_ip_service(child_metadata(isvc, name=engine_service_name(isvc)), selector_labels(isvc))


PREVIEW_SUFFIX = "-preview"


def build_preview_service(isvc: InferenceService, revision: str) -> dict[str, Any]:
    """`<name>-preview`: only the new revision's pods, while a BlueGreen rollout waits for a promote."""
    name = bounded_name(isvc.metadata.name, PREVIEW_SUFFIX)
    service = build_service(isvc)
    labels = {**common_labels(isvc), REVISION_LABEL: revision}
    service["metadata"] = child_metadata(isvc, name=name, labels=labels)
    service["spec"]["selector"] = revision_selector(isvc, revision)
    return service


def build_pod_disruption_budget(isvc: InferenceService) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(isvc),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(isvc)}},
    }


def build_service_account(isvc: InferenceService) -> dict[str, Any]:
    metadata = child_metadata(isvc, name=service_account_name(isvc))
    if isvc.spec.service_account_annotations:
        metadata["annotations"] = dict(isvc.spec.service_account_annotations)
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata,
        "automountServiceAccountToken": False,
    }


def build_children(
    isvc: InferenceService,
    revision: str | None = None,
    replicas: int | str | None = SPEC_REPLICAS,
    preview: bool = False,
    revision_list: Sequence[RevisionEndpoints] | None = None,
    inference_pool_served: bool = True,
    external_autoscaler: bool = True,
    kept_revisions: Sequence[InferenceService] = (),
) -> list[dict[str, Any]]:
    """Every object the InferenceService should own, each stamped with its spec hash: the
    Deployment of the revision being rolled out or served (other revisions' Deployments are only
    scaled and deleted, see operator/rollout), with `preview` its preview Service; the model
    cache's claim and download Job of that revision and of `kept_revisions` (the other revisions
    still running, as InferenceServices with their pod fields).

    `revision_list`: the model's revisions with their weights and ready endpoints, for the
    router (default: none ready yet); `inference_pool_served`: whether the cluster serves the
    InferencePool CRD; `external_autoscaler`: render the HPA or ScaledObject the spec asks for
    (not while a rollout owns the revisions' replicas).
    """
    revision = revision or revision_hash(isvc.spec)
    children = build_cache_children(isvc)
    cached = {child["metadata"]["name"] for child in children}
    for kept in kept_revisions:  # a revision still running keeps its model's claim and download
        children += [c for c in build_cache_children(kept) if c["metadata"]["name"] not in cached]
        cached |= {child["metadata"]["name"] for child in children}
    if isvc.spec.create_service_account:
        children.append(build_service_account(isvc))
    children += [build_deployment(isvc, revision, replicas), build_service(isvc)]
    if preview:
        children.append(build_preview_service(isvc, revision))
    if isvc.spec.most_replicas > 1:
        children.append(build_pod_disruption_budget(isvc))
    if external_autoscaler:
        children += build_external_autoscaler(isvc, revision_deployment_name(isvc, revision))
    if isvc.spec.router.enabled:
        endpoints = revision_endpoints(isvc, []) if revision_list is None else revision_list
        children += build_router_children(isvc, endpoints)
    if isvc.spec.router.inference_pool and inference_pool_served:
        children.append(build_inference_pool(isvc))
    return [with_spec_hash(child) for child in children]
