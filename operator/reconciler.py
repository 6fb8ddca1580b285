"""One reconcile of one InferenceService: parse, build, plan, execute, report status."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from kvpilot.operator.api import InferenceService
from kvpilot.operator.builders import build_children
from kvpilot.operator.executor import KubeClient
from kvpilot.operator.labels import AUTOSCALER_MANAGER, MANAGER, router_name
from kvpilot.operator.planner import plan, replicas_handoff
from kvpilot.operator.router_config import referenced_secrets, revision_endpoints, revisions
from kvpilot.operator.status import (
    compute_status,
    invalid_spec_status,
    missing_secrets_message,
    status_changed,
)
from kvpilot.serving.validation import problems
from pydantic import ValidationError


@dataclass(frozen=True)
class Outcome:
    status_written: bool
    error: str | None = None  # the invalid-spec message, naming the field
    waiting: str | None = None  # what a later reconcile must find (a tenant's Secret), to retry


def describe_validation_error(error: ValidationError) -> str:
    """`spec.engine.tensorParallelSize: ...` for each problem (camelCase paths, as in the manifest)."""
    parts = []
    for problem in problems(error):
        path, message = problem.dotted, problem.message
        parts.append(message if message.startswith(f"{path}.") or not path else f"{path}: {message}")
    return "; ".join(parts)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile(body: dict[str, Any], client: KubeClient, now: str | None = None) -> Outcome:
    now = now or now_rfc3339()
    metadata = body.get("metadata", {})
    previous = body.get("status") or {}
    try:
        isvc = InferenceService.from_body(body)
    except ValidationError as exc:
        error = describe_validation_error(exc)
        status = invalid_spec_status(metadata.get("generation"), error, previous, now)
        changed = status_changed(status, previous)
        if changed:
            client.patch_status(metadata["namespace"], metadata["name"], status)
        return Outcome(status_written=changed, error=error)

    namespace = isvc.metadata.namespace
    observed = client.read_children(isvc)
    slices = []
    if isvc.spec.router.enabled:
        slices = client.read_endpoint_slices(namespace, [r.service for r in revisions(isvc)])
    desired = build_children(isvc, revision_endpoints(isvc, slices), client.serves("InferencePool"))
    for name, replicas in replicas_handoff(desired, observed, MANAGER).items():
        client.apply_replicas(namespace, name, replicas, AUTOSCALER_MANAGER)
    written = client.execute(plan(desired, observed))
    deployments = {obj["metadata"]["name"]: obj for obj in observed if obj["kind"] == "Deployment"}

    def deployment(name: str) -> dict[str, Any] | None:
        return written.get(("Deployment", name)) or deployments.get(name)

    secrets = sorted(referenced_secrets(isvc))
    missing = client.missing_secrets(namespace, secrets) if secrets else []
    status = compute_status(
        isvc, deployment(isvc.metadata.name), previous, now, deployment(router_name(isvc)), missing
    )
    changed = status_changed(status, previous)
    if changed:
        client.patch_status(namespace, isvc.metadata.name, status)
    waiting = missing_secrets_message(isvc, missing) if missing else None
    return Outcome(status_written=changed, waiting=waiting)
