"""Pure builders of the router's children: its Deployment, the `<name>` Service, the ConfigMap with
its config, its PDB, and the Gateway API Inference Extension InferencePool (plain dicts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from kubernetes.utils.quantity import parse_quantity
from kvpilot.operator.api import InferenceService
from kvpilot.operator.containers import cluster_ip_service, http_probe, pod_security_context, security_context
from kvpilot.operator.labels import (
    child_metadata,
    common_labels,
    router_labels,
    router_name,
    router_selector_labels,
    selector_labels,
)
from kvpilot.operator.model_cache import tool_image
from kvpilot.operator.router_config import (
    CONFIG_DIR,
    CONFIG_KEY,
    CONFIG_PATH,
    KEYS_DIR,
    UPSTREAM_KEY_DIR,
    UPSTREAM_KEY_FILE,
    RevisionEndpoints,
    router_config,
)
from kvpilot.serving.contract import DEFAULT_PORT, HEALTH_PATH, METRICS_PATH, PORT_NAME, READY_PATH
from kvpilot.serving.router.activation import MEMORY_SHARE
from kvpilot.serving.router.cli import DEFAULT_PORT as ROUTER_PORT

CONTAINER_NAME = "router"
PRESTOP_SLEEP_SECONDS = 5  # the Service stops sending before the router drains
DRAIN_SECONDS = 30
INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"
ENDPOINT_PICKER_PORT = 9002  # the Gateway API Inference Extension's endpoint picker (ext-proc) port
KEY_FILE_MODE = 0o440  # owner and fsGroup read; nobody writes


def router_args(isvc: InferenceService) -> list[str]:
    """With a memory limit, the request bodies held for scale from zero get a quarter of it."""
    args = ["--config", CONFIG_PATH, "--host", "0.0.0.0", "--port", str(ROUTER_PORT)]
    memory = isvc.spec.router.resources.memory
    if memory is not None:
        args += ["--max-held-bytes", str(int(parse_quantity(memory)) // MEMORY_SHARE)]
    return args


def _resources(isvc: InferenceService) -> dict[str, Any]:
    spec = isvc.spec.router.resources
    requests = {k: v for k, v in {"cpu": spec.cpu, "memory": spec.memory}.items() if v is not None}
    limits = {"memory": spec.memory} if spec.memory is not None else {}
    return {k: v for k, v in {"requests": requests, "limits": limits}.items() if v}


def _keys_volume(isvc: InferenceService) -> dict[str, Any]:
    """Exactly the tenants' Secret keys, one file per tenant, named after the tenant."""
    sources = [
        {
            "secret": {
                "name": tenant.api_key_secret_ref.name,
                "items": [{"key": tenant.api_key_secret_ref.key, "path": tenant.name}],
                "optional": False,
            }
        }
        for tenant in isvc.spec.tenants
    ]
    return {"name": "keys", "projected": {"sources": sources, "defaultMode": KEY_FILE_MODE}}


def _pod_spec(isvc: InferenceService) -> dict[str, Any]:
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes = [
        {"name": "config", "configMap": {"name": router_name(isvc)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if isvc.spec.tenants:
        mounts.append({"name": "keys", "mountPath": KEYS_DIR, "readOnly": True})
        volumes.append(_keys_volume(isvc))
    upstream = isvc.spec.router.upstream_api_key_secret_ref
    if upstream is not None:
        mounts.append({"name": "upstream-key", "mountPath": UPSTREAM_KEY_DIR, "readOnly": True})
        item = {"key": upstream.key, "path": UPSTREAM_KEY_FILE.rpartition("/")[2]}
        source = {"secret": {"name": upstream.name, "items": [item], "optional": False}}
        volumes.append(
            {"name": "upstream-key", "projected": {"sources": [source], "defaultMode": KEY_FILE_MODE}}
        )
    container = {
        "name": CONTAINER_NAME,
        "image": tool_image(isvc),  # the CPU tag: the router needs no GPU libraries
        "imagePullPolicy": "IfNotPresent",
        "command": ["kvpilot", "router"],
        "args": router_args(isvc),
        "ports": [{"name": PORT_NAME, "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": _resources(isvc),
        "volumeMounts": mounts,
        "readinessProbe": http_probe(READY_PATH, period=5, failures=3, timeout=2),
        "livenessProbe": http_probe(HEALTH_PATH, period=10, failures=6, timeout=5),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_SECONDS)]}}},
        "securityContext": security_context(),
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_SECONDS + DRAIN_SECONDS + 10,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if isvc.spec.image_pull_secrets:
        pod["imagePullSecrets"] = [ref.model_dump(by_alias=True) for ref in isvc.spec.image_pull_secrets]
    return pod


def build_router_deployment(isvc: InferenceService) -> dict[str, Any]:
    """The router pods. Its config changes reach them through the mounted ConfigMap (the router
    reloads the file), so an endpoint change never rolls them."""
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(ROUTER_PORT),
        "prometheus.io/path": METRICS_PATH,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(isvc, name=router_name(isvc), labels=router_labels(isvc)),
        "spec": {
            "replicas": isvc.spec.router.replicas,
            "selector": {"matchLabels": router_selector_labels(isvc)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {"labels": router_labels(isvc), "annotations": annotations},
                "spec": _pod_spec(isvc),
            },
        },
    }


def build_router_service(isvc: InferenceService) -> dict[str, Any]:
    """`<name>`: what clients call, in front of the router pods."""
    return cluster_ip_service(child_metadata(isvc, labels=router_labels(isvc)), router_selector_labels(isvc))


def build_router_config_map(
    isvc: InferenceService, revision_list: Sequence[RevisionEndpoints]
) -> dict[str, Any]:
    text = yaml.safe_dump(router_config(isvc, revision_list), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(isvc, name=router_name(isvc), labels=router_labels(isvc)),
        "data": {CONFIG_KEY: text},
    }


def build_router_pod_disruption_budget(isvc: InferenceService) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(isvc, name=router_name(isvc), labels=router_labels(isvc)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": router_selector_labels(isvc)}},
    }


def endpoint_picker_name(isvc: InferenceService) -> str:
    return f"{isvc.metadata.name}-epp"


def build_inference_pool(isvc: InferenceService) -> dict[str, Any]:
    """The engine pods as a Gateway API Inference Extension pool; its endpoint picker is the
    extension's own, deployed as the Service `<name>-epp` (see the README)."""
    return {
        "apiVersion": INFERENCE_POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": child_metadata(isvc, labels=common_labels(isvc)),
        "spec": {
            "selector": {"matchLabels": selector_labels(isvc)},
            "targetPorts": [{"number": DEFAULT_PORT}],
            "endpointPickerRef": {
                "name": endpoint_picker_name(isvc),
                "port": {"number": ENDPOINT_PICKER_PORT},
            },
        },
    }


def build_router_children(
    isvc: InferenceService, revision_list: Sequence[RevisionEndpoints]
) -> list[dict[str, Any]]:
    """ConfigMap first: the pods mount it."""
    children = [
        build_router_config_map(isvc, revision_list),
        build_router_deployment(isvc),
        build_router_service(isvc),
    ]
    if isvc.spec.router.replicas > 1:
        children.append(build_router_pod_disruption_budget(isvc))
    return children
