"""One reconcile of one InferenceService: parse, build, plan, execute, report status."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from kvpilot.operator.api import InferenceService
from kvpilot.operator.builders import build_children
from kvpilot.operator.executor import KubeClient, PermanentApiError
from kvpilot.operator.fit import estimate
from kvpilot.operator.labels import router_name
from kvpilot.operator.model_cache import job_name
from kvpilot.operator.planner import plan
from kvpilot.operator.router_config import referenced_secrets, revision_endpoints, revisions
from kvpilot.operator.status import (
    APPLY_REJECTED,
    DOES_NOT_FIT,
    INVALID_SPEC,
    compute_status,
    invalid_spec_status,
    missing_secrets_message,
    rejected_for_generation,
    status_changed,
)
from kvpilot.serving.validation import problems
from pydantic import ValidationError


@dataclass(frozen=True)
class Outcome:
    status_written: bool
    error: str | None = None  # why the spec cannot work: the message names the field
    reason: str = INVALID_SPEC  # InvalidSpec, ApplyRejected or InsufficientGPUMemory
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
    generation = metadata.get("generation")

    def stall(error: str, reason: str, fit: str | None = None) -> Outcome:
        status = invalid_spec_status(generation, error, previous, now, reason=reason, fit=fit)
        changed = status_changed(status, previous)
        if changed:
            client.patch_status(metadata["namespace"], metadata["name"], status)
        return Outcome(status_written=changed, error=error, reason=reason)

    try:
        isvc = InferenceService.from_body(body)
    except ValidationError as exc:
        return stall(describe_validation_error(exc), INVALID_SPEC)
    held = rejected_for_generation(previous, generation)
    if held is not None:  # rejected for this very spec: wait for a change, never retry in a loop
        return Outcome(status_written=False, error=held, reason=APPLY_REJECTED)
    fit = estimate(isvc)
    if fit is not None and fit.fits is False:
        return stall(f"spec.resources.gpu.memory: {fit.message()}", DOES_NOT_FIT, fit.message())

    namespace = isvc.metadata.namespace
    observed = client.read_children(isvc)
    slices = []
    if isvc.spec.router.enabled:
        slices = client.read_endpoint_slices(namespace, [r.service for r in revisions(isvc)])
    desired = build_children(isvc, revision_endpoints(isvc, slices), client.serves("InferencePool"))
    try:
        written = client.execute(plan(desired, observed))
    except PermanentApiError as exc:
        return stall(str(exc), APPLY_REJECTED)
    by_key = {(obj["kind"], obj["metadata"]["name"]): obj for obj in observed} | written

    def deployment(name: str) -> dict[str, Any] | None:
        return by_key.get(("Deployment", name))

    secrets = sorted(referenced_secrets(isvc))
    missing = client.missing_secrets(namespace, secrets) if secrets else []
    job = by_key.get(("Job", job_name(isvc))) if isvc.spec.model.cache is not None else None
    status = compute_status(
        isvc, deployment(isvc.metadata.name), previous, now, deployment(router_name(isvc)), missing,
        pods=client.read_pods(isvc), job=job, fit=fit,
    )  # fmt: skip
    changed = status_changed(status, previous)
    if changed:
        client.patch_status(namespace, isvc.metadata.name, status)
    waiting = missing_secrets_message(isvc, missing) if missing else None
    return Outcome(status_written=changed, waiting=waiting)
