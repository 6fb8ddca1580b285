"""Revisions: the identity of what shapes the pods (pure).

A revision is a hash of the pod-shaping parts of the spec (model, engine, image, resources,
env, scheduling, and the other fields that reach the pod template). Replicas, autoscaling and
the rollout settings do not make a new revision: changing them never restarts a pod. Each
revision runs in its own Deployment `<name>-<revision>`, labelled `kvpilot.dev/revision`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kvpilot.operator.api import InferenceService, InferenceServiceSpec
from kvpilot.operator.api.router import RouterSpec
from kvpilot.operator.labels import REVISION_LABEL

__all__ = [
    "REVISION_LABEL",
    "ROUTER_POD_FIELDS",
    "pod_spec_fields",
    "revision_deployment_name",
    "revision_hash",
    "with_pod_fields",
]
REVISION_HASH_LENGTH = 10
# Every spec field is one or the other (a test keeps this true for new fields).
POD_FIELDS = (
    "model",
    "engine",
    "resources",
    "scheduling",
    "image",
    "image_pull_secrets",
    "service_account_name",
    "create_service_account",
    "service_account_annotations",
    "env",
    "pod_annotations",
    "pod_labels",
)
# The router's and tenants' settings reach the router pods, not the engine's, except the upstream
# key: the engine pods take it as `--api-key` (an env var from the Secret), so it is part of the
# revision (ROUTER_POD_FIELDS).
NON_POD_FIELDS = ("replicas", "autoscaling", "rollout", "router", "tenants")
ROUTER_POD_FIELDS = ("upstream_api_key_secret_ref",)
# Inside pod-shaping fields, what only feeds the operator's memory fit estimate (operator/fit.py) and
# never reaches a pod: changing it is no new revision.
FIT_ONLY_FIELDS: dict[str, Any] = {"model": {"architecture"}, "resources": {"gpu": {"memory"}}}


def pod_spec_fields(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The pod-shaping fields as written in a manifest, defaults left out (so a new optional
    field in a later version of the API does not change every revision's hash)."""
    include: dict[str, Any] = dict.fromkeys(POD_FIELDS, True) | {"router": set(ROUTER_POD_FIELDS)}
    dumped = spec.model_dump(
        by_alias=True, exclude_defaults=True, mode="json", include=include, exclude=FIT_ONLY_FIELDS
    )
    if not dumped.get("router"):
        dumped.pop("router", None)  # other router settings leave the hash as it was
    return dumped


def revision_hash(spec: InferenceServiceSpec) -> str:
    encoded = json.dumps(pod_spec_fields(spec), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:REVISION_HASH_LENGTH]


def revision_deployment_name(isvc: InferenceService, revision: str) -> str:
    return f"{isvc.metadata.name}-{revision}"


def with_pod_fields(isvc: InferenceService, fields: dict[str, Any]) -> InferenceService:
    """The InferenceService with its pod-shaping fields replaced by a remembered revision's
    (spec.rollout.rollbackTo); replicas, autoscaling, rollout and the other router settings stay
    the spec's own."""
    spec = isvc.spec.model_dump(by_alias=True, exclude_defaults=True, mode="json", exclude=set(POD_FIELDS))
    own = {RouterSpec.model_fields[name].alias for name in ROUTER_POD_FIELDS}
    router = {k: v for k, v in spec.pop("router", {}).items() if k not in own}
    router |= fields.get("router", {})
    merged = InferenceServiceSpec.model_validate({**spec, **fields, "router": router})
    return isvc.model_copy(update={"spec": merged})
