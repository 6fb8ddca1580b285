"""Names, labels, owner references and the spec hash shared by the builders and the planner."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kvpilot.operator.api import API_VERSION, GROUP, KIND, InferenceService

APP_NAME = "kvpilot"
MANAGER = "kvpilot-operator"  # app.kubernetes.io/managed-by and the server-side-apply field manager
AUTOSCALER_MANAGER = "kvpilot-autoscaler"  # the field manager of the engine Deployments' replicas
COMPONENT = "inference-server"
ROUTER_NAME = "kvpilot-router"  # router pods: never matched by the engine pods' selector
ROUTER_COMPONENT = "router"
SPEC_HASH_ANNOTATION = f"{GROUP}/spec-hash"
REVISION_LABEL = f"{GROUP}/revision"  # on a revision's Deployment and its pods
SERVICE_PORT = 80


def selector_labels(isvc: InferenceService) -> dict[str, str]:
    """The immutable pod selector: only what identifies the InferenceService."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": isvc.metadata.name}


def common_labels(isvc: InferenceService) -> dict[str, str]:
    return {
        **selector_labels(isvc),
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/managed-by": MANAGER,
    }


def revision_selector(isvc: InferenceService, revision: str) -> dict[str, str]:
    """The pod selector of one revision's Deployment."""
    return {**selector_labels(isvc), REVISION_LABEL: revision}


def router_selector_labels(isvc: InferenceService) -> dict[str, str]:
    return {"app.kubernetes.io/name": ROUTER_NAME, "app.kubernetes.io/instance": isvc.metadata.name}


def router_labels(isvc: InferenceService) -> dict[str, str]:
    return {
        **router_selector_labels(isvc),
        "app.kubernetes.io/component": ROUTER_COMPONENT,
        "app.kubernetes.io/managed-by": MANAGER,
    }


def owned_selector(isvc: InferenceService) -> str:
    """What every child of the InferenceService carries, engine's and router's alike."""
    return f"app.kubernetes.io/instance={isvc.metadata.name},app.kubernetes.io/managed-by={MANAGER}"


def router_name(isvc: InferenceService) -> str:
    return f"{isvc.metadata.name}-router"


def engine_service_name(isvc: InferenceService) -> str:
    """The engine pods' Service: `<name>` itself without the router, `<name>-engine` behind it."""
    return f"{isvc.metadata.name}-engine" if isvc.spec.router.enabled else isvc.metadata.name


def service_account_name(isvc: InferenceService) -> str | None:
    """The engine pods' (and the download Job's) ServiceAccount: spec.serviceAccountName, or the
    one the operator creates (named like the InferenceService unless that field names it)."""
    spec = isvc.spec
    if spec.create_service_account:
        return spec.service_account_name or isvc.metadata.name
    return spec.service_account_name


def bounded_name(base: str, suffix: str, limit: int = 63) -> str:
    """`<base><suffix>`, within `limit` characters (a name Kubernetes copies into a label value):
    a base too long is cut and a hash of it appended, so that two long bases cut alike differ."""
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    return f"{base[: limit - len(suffix) - len(digest) - 1]}-{digest}{suffix}"


def selector_string(isvc: InferenceService) -> str:
    """status.selector, the form the scale subresource expects."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(isvc).items())


def router_selector_string(isvc: InferenceService) -> str:
    """The router pods' label selector, as a list call takes it."""
    return ",".join(f"{k}={v}" for k, v in router_selector_labels(isvc).items())


def owner_reference(isvc: InferenceService) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": isvc.metadata.name,
        "uid": isvc.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(
    isvc: InferenceService, name: str | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Metadata of a child; without a uid (e.g. `kvpilot render`) there is no owner reference."""
    metadata: dict[str, Any] = {
        "name": name or isvc.metadata.name,
        "namespace": isvc.metadata.namespace,
        "labels": labels or common_labels(isvc),
    }
    if isvc.metadata.uid:
        metadata["ownerReferences"] = [owner_reference(isvc)]
    return metadata


def spec_hash(obj: dict[str, Any]) -> str:
    """A stable hash of a desired object (ignoring a hash already stamped on it)."""
    stripped = json.loads(json.dumps(obj))
    metadata = stripped.get("metadata", {})
    metadata.get("annotations", {}).pop(SPEC_HASH_ANNOTATION, None)
    if metadata.get("annotations") == {}:
        del metadata["annotations"]
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode()).hexdigest()[:16]


def with_spec_hash(obj: dict[str, Any]) -> dict[str, Any]:
    digest = spec_hash(obj)
    metadata = obj["metadata"]
    return {
        **obj,
        "metadata": {
            **metadata,
            "annotations": {**metadata.get("annotations", {}), SPEC_HASH_ANNOTATION: digest},
        },
    }


def is_owned_by(obj: dict[str, Any], uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)
