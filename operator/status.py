"""Status, computed from what was observed (pure).

Conditions follow kstatus: `Ready` is the summary `kubectl wait --for=condition=Ready` waits
on; `Reconciling` and `Stalled` are "abnormal-true" and are False when all is well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvpilot.operator.api import (
    Condition,
    InferenceService,
    InferenceServiceStatus,
    RevisionStatus,
    RolloutStatus,
)
from kvpilot.operator.builders import service_url
from kvpilot.operator.fit import FitEstimate
from kvpilot.operator.labels import APP_NAME, selector_string
from kvpilot.operator.model_cache import DOWNLOAD_POD_NAME, cache_state
from kvpilot.operator.pod_status import failed_download, pod_problem
from kvpilot.operator.router_config import referenced_secrets

READY, RECONCILING, STALLED, MODEL_CACHED = "Ready", "Reconciling", "Stalled", "ModelCached"
# Stalled reasons that only a spec change can clear.
INVALID_SPEC, APPLY_REJECTED = "InvalidSpec", "ApplyRejected"
INSUFFICIENT_GPU_MEMORY, INSUFFICIENT_MEMORY = "InsufficientGPUMemory", "InsufficientMemory"  # the fit
AUTOSCALING = "autoscaling"  # written by the autoscaler (operator/autoscaler/), not by the reconciler
# The status's fields the reconciler writes (camelCase), from the typed model.
STATUS_FIELDS = tuple(
    field.alias or name for name, field in InferenceServiceStatus.model_fields.items() if name != AUTOSCALING
)


def build_conditions(
    states: dict[str, bool],
    reasons: dict[str, tuple[str, str]],
    generation: int | None,
    previous: dict[str, Any],
    now: str,
) -> list[Condition]:
    """One condition per type; lastTransitionTime moves only when a condition's status flips."""
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    conditions = []
    for kind, state in states.items():
        status = "True" if state else "False"
        old = before.get(kind) or {}
        same = old.get("status") == status and old.get("lastTransitionTime")
        reason, message = reasons[kind]
        conditions.append(
            Condition(
                type=kind,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=old["lastTransitionTime"] if same else now,
                observed_generation=generation,
            )
        )
    return conditions


def invalid_spec_status(
    generation: int | None,
    error: str,
    previous: dict[str, Any],
    now: str,
    reason: str = INVALID_SPEC,
    fit: str | None = None,
) -> dict[str, Any]:
    """Stalled: the spec cannot work until someone changes it (an invalid spec, an apply the API
    server rejected, a model that does not fit). What exists is still reported."""
    reasons = {
        READY: (reason, error),
        RECONCILING: (reason, "waiting for a spec change"),
        STALLED: (reason, error),
    }
    states = {READY: False, RECONCILING: False, STALLED: True}
    kept_fields = ("url", "replicas", "readyReplicas", "selector", "desiredReplicas", "revisions", "rollout")
    kept = InferenceServiceStatus.model_validate({k: previous[k] for k in kept_fields if k in previous})
    status = kept.model_copy(
        update={
            "observed_generation": generation,
            "conditions": build_conditions(states, reasons, generation, previous, now),
            "fit": fit,
        }
    )
    return status.to_body()


def rejected_for_generation(previous: dict[str, Any], generation: int | None) -> str | None:
    """The message of Stalled=True/ApplyRejected if it is for this generation: the API server
    would reject the same objects again, so only a spec change retries."""
    for condition in previous.get("conditions") or []:
        if (
            condition.get("type") == STALLED
            and condition.get("status") == "True"
            and condition.get("reason") == APPLY_REJECTED
            and condition.get("observedGeneration") == generation
        ):
            return condition.get("message", "")
    return None


def _deployment_progress(deployment: dict[str, Any] | None, desired: int) -> tuple[str, str, str]:
    """(state, reason, message) with state one of ready, reconciling, stalled."""
    if deployment is None:
        return "reconciling", "CreatingDeployment", "the Deployment does not exist yet"
    status = deployment.get("status") or {}
    generation = deployment.get("metadata", {}).get("generation")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return "stalled", "ProgressDeadlineExceeded", condition.get("message", "rollout stuck")
    if generation is not None and (status.get("observedGeneration") or 0) < generation:
        return "reconciling", "RolloutPending", "the Deployment controller has not seen the latest spec yet"
    ready, updated = status.get("readyReplicas") or 0, status.get("updatedReplicas") or 0
    total = status.get("replicas") or 0
    message = f"{ready}/{desired} replicas ready"
    if updated < desired or ready < desired:
        return "reconciling", "WaitingForReplicas", message
    if total > desired:
        return (
            "reconciling",
            "TerminatingOldReplicas",
            f"{message}, {total - desired} old replicas terminating",
        )
    return "ready", "ReplicasReady", message


def desired_replicas(isvc: InferenceService, deployment: dict[str, Any] | None) -> int:
    """The spec's count, or with autoscaling what the autoscaler last set on the Deployment."""
    if isvc.spec.managed_replicas is not None:
        return isvc.spec.managed_replicas
    scaled = ((deployment or {}).get("spec") or {}).get("replicas")
    return isvc.spec.autoscaling.min_replicas if scaled is None else scaled


@dataclass(frozen=True)
class RolloutReport:
    """What a reconcile's rollout adds to the status: its state, the revisions, the replica
    counts summed over every revision's Deployment, and the total the revisions share."""

    rollout: RolloutStatus
    revisions: list[RevisionStatus]
    replicas: int
    ready_replicas: int
    desired: int


def _pods_named(pods: Sequence[dict[str, Any]], app: str) -> list[dict[str, Any]]:
    return [p for p in pods if (p["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == app]


_SEVERITY = {"ready": 0, "reconciling": 1, "stalled": 2}


def _with_router(
    engine: tuple[str, str, str], router: dict[str, Any] | None, replicas: int
) -> tuple[str, str, str]:
    """The engine's progress and the router's: the worse one wins; both ready is ready."""
    state, reason, message = _deployment_progress(router, replicas)
    routed = (state, reason, f"router: {message}")
    if _SEVERITY[engine[0]] == _SEVERITY[state] == 0:
        return engine[0], engine[1], f"{engine[2]}; {routed[2]}"
    return routed if _SEVERITY[state] > _SEVERITY[engine[0]] else engine


def missing_secrets_message(isvc: InferenceService, missing: Sequence[str]) -> str:
    """Names the Secrets and the fields that need them (never anything from inside a Secret)."""
    fields = referenced_secrets(isvc)
    parts = [f"Secret {name} ({', '.join(fields.get(name, []))})" for name in missing]
    return (
        f"{'; '.join(parts)} not found in namespace {isvc.metadata.namespace}: "
        "the pods that need it start once it exists"
    )


def compute_status(
    isvc: InferenceService,
    deployment: dict[str, Any] | None,
    previous: dict[str, Any],
    now: str,
    router: dict[str, Any] | None = None,
    missing_secrets: Sequence[str] = (),
    report: RolloutReport | None = None,
    *,
    pods: Sequence[dict[str, Any]] = (),
    job: dict[str, Any] | None = None,
    fit: FitEstimate | None = None,
) -> dict[str, Any]:
    """`deployment`: the stable revision's; `router`: the router's Deployment as observed;
    `missing_secrets`: tenants' Secrets that do not exist (Stalled until someone creates them);
    `pods`: the engine pods of the revisions kept (served or rolled out) and the download pods
    (why replicas wait); `job`: the model download Job of the revision being applied, if any.
    During a rollout Ready is False and Reconciling True (the spec's revision is not serving all
    traffic yet), the message naming a pod that cannot start; a rollout rolled back or failed is
    Stalled (a human must change the spec) while Ready follows the stable revision."""
    generation = isvc.metadata.generation
    desired = report.desired if report else desired_replicas(isvc, deployment)
    state, reason, message = _deployment_progress(deployment, desired)
    problem = pod_problem(_pods_named(pods, APP_NAME))
    if state == "reconciling":
        reason, message = problem or (reason, message)
    if isvc.spec.router.enabled:
        state, reason, message = _with_router((state, reason, message), router, isvc.spec.router.replicas)
    cached = None
    if isvc.spec.model.cache is not None:
        cached, cache_reason, cache_message = cache_state(job)
        if cached == "failed":
            detail = failed_download(_pods_named(pods, DOWNLOAD_POD_NAME))
            cache_message += f"; {detail}" if detail else ""
            state, reason, message = "stalled", cache_reason, cache_message
        elif cached == "downloading" and state != "ready":
            reason, message = cache_reason, cache_message
    if missing_secrets:
        state, reason, message = "stalled", "SecretNotFound", missing_secrets_message(isvc, missing_secrets)
    states = {READY: state == "ready", RECONCILING: state == "reconciling", STALLED: state == "stalled"}
    reasons = dict.fromkeys(states, (reason, message))
    rollout = report.rollout if report else None
    if rollout is not None and rollout.phase in ("Progressing", "Paused") and state != "stalled":
        states = {READY: False, RECONCILING: True, STALLED: False}
        detail = f"{rollout.message}; {problem[1]}" if problem else rollout.message
        reasons = dict.fromkeys(states, (f"Rollout{rollout.phase}", detail))
    elif rollout is not None and rollout.phase in ("RolledBack", "Failed"):
        states[STALLED] = True
        kind = "RolloutAborted" if rollout.phase == "RolledBack" else "RolloutFailed"
        reasons[STALLED] = (kind, f"revision {rollout.revision}: {rollout.message}")
    if cached is not None:
        states[MODEL_CACHED] = cached == "cached"
        reasons[MODEL_CACHED] = (cache_reason, cache_message)
    observed = (deployment or {}).get("status") or {}
    status = InferenceServiceStatus(
        observed_generation=generation,
        url=service_url(isvc),
        replicas=report.replicas if report else observed.get("replicas") or 0,
        ready_replicas=report.ready_replicas if report else observed.get("readyReplicas") or 0,
        selector=selector_string(isvc),
        desired_replicas=desired,
        conditions=build_conditions(states, reasons, generation, previous, now),
        revisions=report.revisions if report else None,
        rollout=rollout,
        fit=fit.message() if fit is not None else None,
    )
    body = status.to_body()
    if previous.get(AUTOSCALING) is not None and not isvc.spec.uses_own_autoscaler:
        body[AUTOSCALING] = None  # the autoscaler's record goes with it (a merge patch removes it)
    return body


def status_patch(new: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch from `previous` to `new`: a key `new` no longer has is sent as null,
    so the API server removes it (a merge patch leaves keys it does not mention, e.g. a finished
    rollout's `step`, in place). Lists are replaced whole."""
    patch = dict(new)
    for key, old in previous.items():
        if key == AUTOSCALING and key not in new:
            continue  # the autoscaler's own record: the reconciler removes it only by naming it
        if key not in new:
            patch[key] = None
        elif isinstance(old, dict) and isinstance(new[key], dict):
            patch[key] = status_patch(new[key], old)
    return patch


def status_changed(new: dict[str, Any], previous: dict[str, Any]) -> bool:
    stale_autoscaling = AUTOSCALING in new and new[AUTOSCALING] != previous.get(AUTOSCALING)
    return stale_autoscaling or any(new.get(k) != previous.get(k) for k in STATUS_FIELDS)
