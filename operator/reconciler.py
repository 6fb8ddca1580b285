"""One reconcile of one InferenceService: parse, plan the rollout, build, plan, execute, report
status."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from kvpilot.operator.api import AnalysisResult, InferenceService, RevisionStatus, RolloutStatus
from kvpilot.operator.builders import build_children
from kvpilot.operator.defaults import NO_DEFAULTS, ClusterDefaults, with_cluster_defaults
from kvpilot.operator.executor import KubeClient, PermanentApiError
from kvpilot.operator.fit import estimate
from kvpilot.operator.labels import AUTOSCALER_MANAGER, MANAGER, router_name, router_selector_string
from kvpilot.operator.model_cache import DOWNLOAD_POD_NAME, job_name
from kvpilot.operator.planner import Plan, plan, replicas_handoff
from kvpilot.operator.revision import revision_deployment_name, revision_hash, with_pod_fields
from kvpilot.operator.rollout.analysis import RevisionCounters, analyze, check_counters, is_due, reads_router
from kvpilot.operator.rollout.observe import (
    observe_revisions,
    revision_of,
    revision_statuses,
    revision_traffic,
)
from kvpilot.operator.rollout.planner import Commands, Event, ObservedRevision, RolloutInputs, plan_rollout
from kvpilot.operator.rollout.scrape import analysis_metrics_urls, scrape
from kvpilot.operator.rollout.state import autoscaled_revision, rfc3339
from kvpilot.operator.router_config import referenced_secrets
from kvpilot.operator.status import (
    APPLY_REJECTED,
    INSUFFICIENT_GPU_MEMORY,
    INSUFFICIENT_MEMORY,
    INVALID_SPEC,
    RolloutReport,
    compute_status,
    invalid_spec_status,
    missing_secrets_message,
    rejected_for_generation,
    status_changed,
    status_patch,
)
from kvpilot.serving.validation import problems
from pydantic import ValidationError


@dataclass(frozen=True)
class Outcome:
    status_written: bool
    error: str | None = None  # why the spec cannot work: the message names the field
    reason: str = INVALID_SPEC  # InvalidSpec, ApplyRejected, InsufficientGPUMemory or InsufficientMemory
    waiting: str | None = None  # what a later reconcile must find (a tenant's Secret), to retry
    requeue_after: float | None = None  # seconds until the rollout needs another look
    events: list[Event] = field(default_factory=list)


def describe_validation_error(error: ValidationError) -> str:
    """`spec.engine.tensorParallelSize: ...` for each problem (camelCase paths, as in the manifest)."""
    parts = []
    for problem in problems(error):
        path, message = problem.dotted, problem.message
        named = not path or message.startswith((f"{path}.", f"{path}:", f"{path} "))
        parts.append(message if named else f"{path}: {message}")
    return "; ".join(parts)


def now_rfc3339() -> str:
    return rfc3339(datetime.datetime.now(datetime.UTC))


def serving_revision(isvc: InferenceService, remembered: list[RevisionStatus]) -> InferenceService:
    """The InferenceService as it should run: its own pods, or a remembered revision's (rollbackTo)."""
    wanted = isvc.spec.rollout.rollback_to
    if wanted is None:
        return isvc
    known = next((r for r in remembered if r.hash == wanted and r.spec), None)
    if known is None:
        names = ", ".join(r.hash for r in remembered if r.spec) or "none"
        raise ValueError(f"spec.rollout.rollbackTo: revision {wanted} is not remembered (known: {names})")
    return with_pod_fields(isvc, known.spec)


def desired_total(
    isvc: InferenceService,
    previous: RolloutStatus | None,
    revisions: dict[str, ObservedRevision],
    autoscaling: dict[str, Any] | None = None,
) -> int:
    """The replicas the revisions share: spec.replicas; with kvpilot's autoscaler, its decision
    (`status.autoscaling.desiredReplicas`, shared by weight during a rollout); with an HPA or
    KEDA, what it set on the stable revision's Deployment, held while a rollout runs (the HPA is
    not rendered then), all clamped to the bounds."""
    if isvc.spec.managed_replicas is not None:
        return isvc.spec.managed_replicas
    bounds = isvc.spec.autoscaling
    decided = (autoscaling or {}).get("desiredReplicas")
    if isvc.spec.uses_own_autoscaler and decided is not None:
        return min(max(decided, bounds.min_replicas), bounds.max_replicas)
    if previous is not None and previous.phase in ("Progressing", "Paused") and previous.replicas:
        return previous.replicas
    stable = revisions.get(previous.stable_revision) if previous else None
    scaled = stable.replicas if stable and stable.replicas else bounds.min_replicas
    return min(max(scaled, bounds.min_replicas), bounds.max_replicas)


def _analysis_check(
    isvc: InferenceService,
    previous: RolloutStatus | None,
    target: str,
    pods: list[dict[str, Any]],
    client: KubeClient,
    now: datetime.datetime,
) -> AnalysisResult | None:
    """A check of the new revision when one is due: the router's per-revision metrics since the
    last check (summed over its ready pods), or the revision's engine pods' without the router
    and during a BlueGreen preview (see analysis.reads_router)."""
    spec = isvc.spec.rollout.analysis
    if previous is None or previous.revision != target or previous.phase not in ("Progressing", "Paused"):
        return None
    last = previous.last_analysis
    if not is_due(last, spec, previous, now):
        return None
    via_router = reads_router(previous, isvc.spec.router.enabled)
    routers = client.list_pods(isvc.metadata.namespace, router_selector_string(isvc)) if via_router else None
    pages = scrape(analysis_metrics_urls(target, pods, routers))
    baseline = RevisionCounters.from_status(last.counters) if last else None
    return analyze(spec, check_counters(pages, isvc.spec.model.name, target, via_router), baseline, now)


def _pod_app(pod: dict[str, Any]) -> str | None:
    return (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/name")


def _stall(
    body: dict[str, Any],
    client: KubeClient,
    error: str,
    now: str,
    reason: str = INVALID_SPEC,
    fit: str | None = None,
) -> Outcome:
    """Stalled until the spec changes: invalid, rejected by the API server, or too big to fit."""
    metadata, previous = body.get("metadata", {}), body.get("status") or {}
    status = invalid_spec_status(metadata.get("generation"), error, previous, now, reason=reason, fit=fit)
    changed = status_changed(status, previous)
    if changed:
        client.patch_status(metadata["namespace"], metadata["name"], status_patch(status, previous))
    return Outcome(status_written=changed, error=error, reason=reason)


def reconcile(
    body: dict[str, Any],
    client: KubeClient,
    now: datetime.datetime | None = None,
    defaults: ClusterDefaults = NO_DEFAULTS,
) -> Outcome:
    """One pass: the InferenceService (with the cluster's defaults, see operator/defaults.py)
    against what exists; writes the plan, the rollout's scaling and the status."""
    moment = now or datetime.datetime.now(datetime.UTC)
    stamp = rfc3339(moment)
    metadata = body.get("metadata", {})
    previous = body.get("status") or {}
    try:
        isvc = with_cluster_defaults(InferenceService.from_body(body), defaults)
        previous_rollout = (
            RolloutStatus.model_validate(previous["rollout"]) if previous.get("rollout") else None
        )
        remembered = [RevisionStatus.model_validate(r) for r in previous.get("revisions") or []]
        serving = serving_revision(isvc, remembered)
    except ValidationError as exc:
        return _stall(body, client, describe_validation_error(exc), stamp)
    except ValueError as exc:
        return _stall(body, client, str(exc), stamp)
    held = rejected_for_generation(previous, metadata.get("generation"))
    if held is not None:  # rejected for this very spec: wait for a change, never retry in a loop
        return Outcome(status_written=False, error=held, reason=APPLY_REJECTED)
    fit = estimate(serving)
    if fit is not None and fit.fits is False:
        reason = INSUFFICIENT_GPU_MEMORY if fit.on_gpu else INSUFFICIENT_MEMORY
        return _stall(body, client, f"{fit.memory_field}: {fit.message()}", stamp, reason, fit.message())

    target = revision_hash(serving.spec)
    observed = client.read_children(isvc)
    deployments = [o for o in observed if o["kind"] == "Deployment" and revision_of(o)]
    pods = client.read_pods(isvc)
    revisions = observe_revisions(deployments, pods)
    total = desired_total(isvc, previous_rollout, revisions, previous.get("autoscaling"))
    rollout = plan_rollout(
        RolloutInputs(
            spec=isvc.spec.rollout,
            target=target,
            total=total,
            revisions=revisions,
            now=moment,
            previous=previous_rollout,
            analysis=_analysis_check(serving, previous_rollout, target, pods, client, moment),
            commands=Commands.from_annotations(metadata.get("annotations")),
        )
    )
    replicas = rollout.revisions[target].replicas
    # One owner of each Deployment's replicas at a time: the reconciler while the revisions share
    # the total (a rollout, or a first revision being created), otherwise the autoscaler when
    # `autoscaling` is set (kvpilot's under its own field manager, or the HPA/ScaledObject).
    autoscaled = autoscaled_revision(rollout.status) if isvc.spec.autoscaling else None
    owns_replicas = autoscaled != target or target not in revisions
    # The serving revision's Deployment is applied whole; other revisions' are only scaled or
    # deleted. A Deployment from before revisions (`<name>`, no revision label) serves until the
    # first revision is ready, so an operator upgrade never leaves the model without pods.
    name = isvc.metadata.name
    legacy = [
        o
        for o in observed
        if (o["kind"], o["metadata"]["name"]) == ("Deployment", name) and not revision_of(o)
    ]
    first = revisions.get(rollout.status.stable_revision)
    if legacy and first is not None and first.ready >= total:
        client.execute(Plan(delete=legacy))
    others = [o for o in deployments if revision_of(o) != target] + legacy
    status = rollout.status
    preview = status.strategy == "BlueGreen" and status.phase in ("Progressing", "Paused")
    traffic = None
    if isvc.spec.router.enabled:  # the router splits new requests by the planner's weights
        traffic = revision_traffic(rollout, pods)
    live = set(rollout.revisions) - set(rollout.delete)
    kept = [
        with_pod_fields(isvc, r.spec)
        for r in remembered
        if r.hash in live and r.hash != target and r.spec is not None
    ]
    desired = build_children(
        serving,
        target,
        replicas if owns_replicas else None,
        preview=preview,
        revision_list=traffic,
        inference_pool_served=client.serves("InferencePool"),
        external_autoscaler=autoscaled is not None,
        kept_revisions=kept,
    )
    current = [o for o in observed if o not in others]
    namespace = isvc.metadata.namespace
    for deployment, count in replicas_handoff(desired, current, MANAGER).items():
        client.apply_replicas(namespace, deployment, count, AUTOSCALER_MANAGER)
    try:
        written = client.execute(plan(desired, current))
    except PermanentApiError as exc:
        return _stall(body, client, str(exc), stamp, APPLY_REJECTED)
    for revision, planned in rollout.revisions.items():
        seen = revisions.get(revision)
        if revision != target and seen is not None and seen.replicas != planned.replicas:
            client.scale_deployment(namespace, revision_deployment_name(isvc, revision), planned.replicas)
    gone = [o for o in others if revision_of(o) in rollout.delete]
    if gone:
        client.execute(Plan(delete=gone))
    for event in rollout.events:
        client.post_event(isvc, event.type, event.reason, event.message, stamp)

    by_revision = {revision_of(o): o for o in deployments}
    by_revision.update(
        {
            revision_of(o): o
            for o in written.values()
            if o.get("kind", "Deployment") == "Deployment" and revision_of(o)
        }
    )
    stable = by_revision.get(rollout.status.stable_revision)
    counted = [o for r, o in by_revision.items() if r not in rollout.delete]
    report = RolloutReport(
        rollout=rollout.status.model_copy(update={"replicas": total}),
        revisions=revision_statuses(isvc, serving, target, rollout, revisions, remembered, moment),
        replicas=sum((o.get("status") or {}).get("replicas") or 0 for o in counted),
        ready_replicas=sum((o.get("status") or {}).get("readyReplicas") or 0 for o in counted),
        desired=total,
    )
    router = written.get(("Deployment", router_name(isvc))) or next(
        (o for o in observed if (o["kind"], o["metadata"]["name"]) == ("Deployment", router_name(isvc))), None
    )
    secrets = sorted(referenced_secrets(isvc))
    missing = client.missing_secrets(namespace, secrets) if secrets else []
    job = None
    if serving.spec.model.cache is not None:
        key = ("Job", job_name(serving))
        job = written.get(key) or next(
            (o for o in observed if (o["kind"], o["metadata"]["name"]) == key), None
        )
    # Why replicas wait: the pods of the revisions kept (served or rolled out), and the downloads.
    waiting_pods = [p for p in pods if revision_of(p) in live or _pod_app(p) == DOWNLOAD_POD_NAME]
    new_status = compute_status(
        serving, stable, previous, stamp, router, missing, report, pods=waiting_pods, job=job, fit=fit
    )
    changed = status_changed(new_status, previous)
    if changed:
        client.patch_status(namespace, isvc.metadata.name, status_patch(new_status, previous))
    waiting = missing_secrets_message(isvc, missing) if missing else None
    return Outcome(
        status_written=changed, waiting=waiting, requeue_after=rollout.requeue_after, events=rollout.events
    )
