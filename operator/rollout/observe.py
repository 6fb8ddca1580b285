"""What the planner needs to know about each revision, read from its Deployment and pods (pure);
`status.revisions` and the router's per-revision weights and endpoints, built from the plan."""

from __future__ import annotations

import datetime
from typing import Any

from kvpilot.operator.api import InferenceService, RevisionStatus
from kvpilot.operator.labels import REVISION_LABEL
from kvpilot.operator.model_cache import server_image
from kvpilot.operator.revision import pod_spec_fields, revision_deployment_name
from kvpilot.operator.rollout.state import ObservedRevision, RolloutPlan, parse_time
from kvpilot.operator.router_config import RevisionEndpoints
from kvpilot.serving.contract import DEFAULT_PORT

REMEMBERED_REVISIONS = 3  # retired or failed revisions kept in status.revisions (for rollbackTo)
FAILING_REASONS = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "InvalidImageName",
}


def revision_of(obj: dict[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)


def _condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), {})


def pod_failure(pod: dict[str, Any]) -> str:
    """Why a pod cannot become ready (crash loop, image, failed init container), or ""."""
    status = pod.get("status") or {}
    for kind in ("initContainerStatuses", "containerStatuses"):
        for container in status.get(kind) or []:
            state = container.get("state") or {}
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in FAILING_REASONS:
                previous = (container.get("lastState") or {}).get("terminated") or {}
                last, killed = previous.get("exitCode"), previous.get("reason") == "OOMKilled"
                exited = (
                    f", last exit code {last}{' (OOMKilled)' if killed else ''}" if last is not None else ""
                )
                restarts = container.get("restartCount", 0)
                return (
                    f"{waiting['reason']}: container {container.get('name')} ({restarts} restarts{exited})"
                    + (f": {waiting['message']}" if waiting.get("message") else "")
                )
            terminated = state.get("terminated") or {}
            if kind == "initContainerStatuses" and terminated.get("exitCode", 0) != 0:
                return f"init container {container.get('name')} failed (exit code {terminated['exitCode']})"
    return ""


def observe_revisions(
    deployments: list[dict[str, Any]], pods: list[dict[str, Any]]
) -> dict[str, ObservedRevision]:
    """Each revision's replicas and ready pods, its oldest Unschedulable pod and a failure, if any."""
    observed = {}
    for deployment in deployments:
        revision = revision_of(deployment)
        if revision is None:
            continue
        mine = [
            pod
            for pod in pods
            if revision_of(pod) == revision and not pod["metadata"].get("deletionTimestamp")
        ]
        since, message = None, ""
        for pod in mine:
            scheduled = _condition(pod, "PodScheduled")
            if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
                moment = parse_time(scheduled["lastTransitionTime"])
                if since is None or moment < since:
                    since, message = moment, scheduled.get("message", "")
        failure = next((f for f in map(pod_failure, mine) if f), "")
        observed[revision] = ObservedRevision(
            replicas=(deployment.get("spec") or {}).get("replicas", 0) or 0,
            ready=(deployment.get("status") or {}).get("readyReplicas", 0) or 0,
            unschedulable_since=since,
            unschedulable_message=message,
            failure=failure,
        )
    return observed


def pod_is_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    return ready and bool(status.get("podIP")) and not pod["metadata"].get("deletionTimestamp")


def revision_traffic(plan: RolloutPlan, pods: list[dict[str, Any]]) -> list[RevisionEndpoints]:
    """Each revision the plan keeps, with its weight and the ready endpoints of its pods (the
    router config's `revisions`); a retired revision gets weight 0 so it drains."""
    traffic = []
    for revision, planned in plan.revisions.items():
        endpoints = sorted(
            f"http://{pod['status']['podIP']}:{DEFAULT_PORT}"
            for pod in pods
            if revision_of(pod) == revision and pod_is_ready(pod)
        )
        traffic.append(RevisionEndpoints(revision, planned.weight, tuple(endpoints)))
    return traffic


def revision_statuses(
    isvc: InferenceService,
    serving: InferenceService,
    target: str,
    plan: RolloutPlan,
    observed: dict[str, ObservedRevision],
    previous: list[RevisionStatus],
    now: datetime.datetime,
) -> list[RevisionStatus]:
    """Revisions with a Deployment (newest first), then the last REMEMBERED_REVISIONS gone ones."""
    before = {r.hash: r for r in previous}
    stamp = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    current = []
    for revision, planned in plan.revisions.items():
        known = before.get(revision)
        spec = serving.spec if revision == target else None
        seen = observed.get(revision)
        entry = RevisionStatus(
            name=revision_deployment_name(isvc, revision),
            hash=revision,
            model=spec.model.name if spec else known.model if known else "",
            quantization=spec.engine.quantization if spec else known.quantization if known else "",
            image=server_image(serving) if spec else known.image if known else "",
            replicas=seen.replicas if seen else 0,
            ready_replicas=seen.ready if seen else 0,
            weight=planned.weight,
            created_at=known.created_at if known else stamp,
            phase=planned.phase,
            spec=pod_spec_fields(spec) if spec else known.spec if known else {},
        )
        current.append(entry)
    current.sort(key=lambda r: r.created_at, reverse=True)
    gone = [
        r.model_copy(update={"replicas": 0, "ready_replicas": 0, "weight": 0, "phase": _gone_phase(r)})
        for r in previous
        if r.hash not in plan.revisions
    ]
    return current + gone[:REMEMBERED_REVISIONS]


def _gone_phase(revision: RevisionStatus) -> str:
    return "Failed" if revision.phase == "Failed" else "Retired"
