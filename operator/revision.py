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
from kvpilot.operator.labels import REVISION_LABEL

__all__ = [
    "REVISION_LABEL",
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
# The router's and tenants' settings reach the router pods, not the engine's; the one router
# field the engine pods see (upstreamApiKeySecretRef, an env var) updates the serving revision's
# Deployment in place.
NON_POD_FIELDS = ("replicas", "autoscaling", "rollout", "router", "tenants")
# Inside pod-shaping fields, what only feeds the operator's GPU fit estimate (operator/fit.py) and
# never reaches a pod: changing it is no new revision.
FIT_ONLY_FIELDS: dict[str, Any] = {"model": {"architecture"}, "resources": {"gpu": {"memory"}}}


def pod_spec_fields(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The pod-shaping fields as written in a manifest, defaults left out (so a new optional
    field in a later version of the API does not change every revision's hash)."""
    return spec.model_dump(
        by_alias=True,
        exclude_defaults=True,
        mode="json",
        include=set(POD_FIELDS),
        exclude=FIT_ONLY_FIELDS,
    )


def revision_hash(spec: InferenceServiceSpec) -> str:
    encoded = json.dumps(pod_spec_fields(spec), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:REVISION_HASH_LENGTH]


def revision_deployment_name(isvc: InferenceService, revision: str) -> str:
    return f"{isvc.metadata.name}-{revision}"


def with_pod_fields(isvc: InferenceService, fields: dict[str, Any]) -> InferenceService:
    """The InferenceService with its pod-shaping fields replaced by a remembered revision's
    (spec.rollout.rollbackTo); replicas, autoscaling and rollout stay the spec's own."""
    spec = isvc.spec.model_dump(by_alias=True, exclude_defaults=True, mode="json", exclude=set(POD_FIELDS))
    merged = InferenceServiceSpec.model_validate({**spec, **fields})
    return isvc.model_copy(update={"spec": merged})
