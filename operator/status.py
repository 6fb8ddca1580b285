"""Status, computed from what was observed (pure).

Conditions follow kstatus: `Ready` is the summary `kubectl wait --for=condition=Ready` waits
on; `Reconciling` and `Stalled` are "abnormal-true" and are False when all is well.
"""

from __future__ import annotations

from typing import Any

from kvpilot.operator.builders import service_url
from kvpilot.operator.labels import selector_string
from kvpilot.operator.models import InferenceService

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"
STATUS_FIELDS = ("observedGeneration", "conditions", "url", "replicas", "readyReplicas", "selector")


def _condition(kind: str, status: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    condition = {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def _stamp(conditions: list[dict[str, Any]], previous: dict[str, Any], now: str) -> list[dict[str, Any]]:
    """lastTransitionTime moves only when a condition's status flips."""
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    stamped = []
    for condition in conditions:
        old = before.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime")
        stamped.append({**condition, "lastTransitionTime": old["lastTransitionTime"] if same else now})
    return stamped


def invalid_spec_status(
    generation: int | None, error: str, previous: dict[str, Any], now: str
) -> dict[str, Any]:
    """Stalled: the spec cannot work until someone changes it. What exists is still reported."""
    conditions = [
        _condition(READY, False, "InvalidSpec", error, generation),
        _condition(RECONCILING, False, "InvalidSpec", "waiting for a valid spec", generation),
        _condition(STALLED, True, "InvalidSpec", error, generation),
    ]
    kept = {k: previous[k] for k in ("url", "replicas", "readyReplicas", "selector") if k in previous}
    return {"observedGeneration": generation, **kept, "conditions": _stamp(conditions, previous, now)}


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


def compute_status(
    isvc: InferenceService, deployment: dict[str, Any] | None, previous: dict[str, Any], now: str
) -> dict[str, Any]:
    generation = isvc.metadata.generation
    state, reason, message = _deployment_progress(deployment, isvc.spec.effective_replicas)
    conditions = [
        _condition(READY, state == "ready", reason, message, generation),
        _condition(RECONCILING, state == "reconciling", reason, message, generation),
        _condition(STALLED, state == "stalled", reason, message, generation),
    ]
    observed = (deployment or {}).get("status") or {}
    return {
        "observedGeneration": generation,
        "url": service_url(isvc),
        "replicas": observed.get("replicas") or 0,
        "readyReplicas": observed.get("readyReplicas") or 0,
        "selector": selector_string(isvc),
        "conditions": _stamp(conditions, previous, now),
    }


def status_changed(new: dict[str, Any], previous: dict[str, Any]) -> bool:
    return any(new.get(k) != previous.get(k) for k in STATUS_FIELDS)
