"""Thin kopf handlers: `kopf run -m kvpilot.operator.handlers` (or `kvpilot operator`).

Every path ends in the same reconcile: the InferenceService's own create/update/resume, changes
of its Deployments or Services (readiness moving, drift, deletion), changes of its engine pods'
EndpointSlices (which keep the router's endpoint lists current), and a timer while a rollout is
under way. There is no
finalizer: children carry ownerReferences and the garbage collector removes them, so
deleting an InferenceService never waits for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kopf
from kvpilot.operator.api import GROUP, KIND, PLURAL, VERSION, RolloutStatus
from kvpilot.operator.autoscaler.loop import RECORD_ENV, Autoscaler
from kvpilot.operator.defaults import NO_DEFAULTS, ClusterDefaults
from kvpilot.operator.executor import KubeClient, PermanentApiError, TransientError
from kvpilot.operator.labels import COMPONENT, MANAGER
from kvpilot.operator.reconciler import reconcile
from kvpilot.operator.rollout.state import autoscaled_revision
from pydantic import ValidationError

MAX_BACKOFF_SECONDS = 60
ROLLOUT_TICK_SECONDS = 5.0  # how often a rollout in progress is looked at (pauses, deadlines, capacity)
ACTIVE_ROLLOUT_PHASES = ("Progressing", "Paused")
CHILD_LABELS = {"app.kubernetes.io/managed-by": MANAGER}
INSTANCE_LABEL = "app.kubernetes.io/instance"
# The EndpointSlice controller copies a Service's labels to its slices: these are the engine's.
ENGINE_SLICE_LABELS = {"app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/component": COMPONENT}


class KeyedLocks:
    """One lock per key, dropped as soon as nobody holds or waits for it (so the table does not
    grow with every InferenceService the operator has ever seen)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[Any, list] = {}  # key -> [lock, holders and waiters]

    @contextmanager
    def hold(self, key: Any) -> Iterator[None]:
        with self._guard:
            entry = self._entries.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


# One reconcile per InferenceService at a time: its own handler and its children's events
# run in kopf's thread pool and would otherwise race to create the same child.
_locks = KeyedLocks()


def backoff(retry: int) -> float:
    return float(min(2**retry, MAX_BACKOFF_SECONDS))


def _client(memo: kopf.Memo) -> KubeClient:
    # Built lazily: kopf logs in (and configures the kubernetes client) after startup handlers.
    if "client" not in memo:
        memo["client"] = KubeClient()
    return memo["client"]


class WaitingError(Exception):
    """The reconcile went through but needs something that does not exist yet (a Secret)."""


def _reconcile_and_report(namespace: str, name: str, uid: str | None, memo: kopf.Memo) -> None:
    """Reconcile the InferenceService as the API has it now: read inside the lock, so a rollout
    always plans from the status the previous reconcile wrote (kopf's event body, or a timer's,
    can be older than that)."""
    client = _client(memo)
    with _locks.hold((namespace, name)):
        body = client.get_inference_service(namespace, name)
        if body is None or (uid is not None and body["metadata"].get("uid") != uid):
            return  # the owner is gone; the garbage collector takes the children
        if body["metadata"].get("deletionTimestamp"):
            return
        outcome = reconcile(body, client, defaults=memo.get("defaults", NO_DEFAULTS))
    if outcome.error is not None:
        if outcome.status_written:  # one Warning Event per new problem, not one per retry
            kopf.warn(body, reason=outcome.reason, message=outcome.error)
        raise kopf.PermanentError(outcome.error)
    if outcome.waiting is not None:
        if outcome.status_written:
            kopf.warn(body, reason="SecretNotFound", message=outcome.waiting)
        raise WaitingError(outcome.waiting)


def _reconcile_body(body: kopf.Body, memo: kopf.Memo) -> None:
    metadata = body.metadata
    _reconcile_and_report(metadata.namespace, metadata.name, metadata.uid, memo)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # post Warning events only, not every success
    settings.watching.server_timeout = 600
    settings.execution.max_workers = 8


@kopf.on.startup()
def read_cluster_defaults(memo: kopf.Memo, **_: Any) -> None:
    """The chart's cluster-wide defaults (`kvpilot operator --default-model-cache-*`)."""
    memo["defaults"] = ClusterDefaults.from_environ()


@kopf.on.startup()
async def start_autoscaler(memo: kopf.Memo, **_: Any) -> None:
    """kvpilot's autoscaler: one task for every InferenceService with `autoscaling.engine: kvpilot`."""
    clients: list[KubeClient] = []

    def client() -> KubeClient:  # built on first use, once kopf has logged in
        if not clients:
            clients.append(KubeClient())
        return clients[0]

    record_dir = os.environ.get(RECORD_ENV)
    memo["autoscaler"] = autoscaler = Autoscaler(client, record_dir=Path(record_dir) if record_dir else None)
    memo["autoscaler_task"] = asyncio.create_task(autoscaler.run(), name="kvpilot-autoscaler")


@kopf.on.cleanup()
async def stop_autoscaler(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("autoscaler_task")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@kopf.on.event(GROUP, VERSION, PLURAL)
async def track_for_autoscaling(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every InferenceService event updates what the autoscaler tracks (added, changed, deleted)."""
    memo["autoscaler"].observe(event.get("type"), dict(body))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile_inference_service(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    try:
        _reconcile_body(body, memo)
    except (TransientError, WaitingError) as exc:
        raise kopf.TemporaryError(str(exc), delay=backoff(retry)) from exc
    except PermanentApiError as exc:
        raise kopf.PermanentError(str(exc)) from exc


def _rollout_active(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """A rollout under way, or revisions whose replicas the operator shares out of the autoscaler's
    total (a rolled-back revision kept): the autoscaler's decisions reach them on the next tick."""
    rollout = status.get("rollout") or {}
    if rollout.get("phase") in ACTIVE_ROLLOUT_PHASES:
        return True
    try:
        parsed = RolloutStatus.model_validate(rollout) if rollout else None
    except ValidationError:
        return False
    return spec.get("autoscaling") is not None and parsed is not None and autoscaled_revision(parsed) is None


@kopf.timer(GROUP, VERSION, PLURAL, interval=ROLLOUT_TICK_SECONDS, when=_rollout_active)
def rollout_tick(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """A rollout moves with time too (a pause ends, a deadline passes, a pod stays Unschedulable):
    reconcile it while it is under way. The decision still comes from the object alone."""
    try:
        _reconcile_body(body, memo)
    except (TransientError, PermanentApiError, WaitingError, kopf.PermanentError) as exc:
        logger.warning(f"rollout reconcile of {body.metadata.name} failed: {exc}")


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "services", labels=CHILD_LABELS)
@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
def child_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """A child moved (readiness, drift, deletion, a download's progress): reconcile its
    InferenceService again."""
    owner = next(
        (
            ref
            for ref in body.metadata.get("ownerReferences") or []
            if ref.get("kind") == KIND and ref.get("controller")
        ),
        None,
    )
    if owner is not None:
        _reconcile_parent(body, owner["name"], owner.get("uid"), memo, logger)


def _pod_waits(body: kopf.Body, **_: Any) -> bool:
    """A ready pod has nothing to explain (and its readiness reaches the Deployment's status)."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


@kopf.on.event("", "v1", "pods", labels={**CHILD_LABELS, INSTANCE_LABEL: kopf.PRESENT}, when=_pod_waits)
def pod_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """A pod of an InferenceService moved (scheduled or not, pulling, crashing): its status says why
    replicas wait. Pods are owned by ReplicaSets and Jobs, so the instance label names the parent."""
    _reconcile_parent(body, body.metadata.labels[INSTANCE_LABEL], None, memo, logger)


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices", labels=ENGINE_SLICE_LABELS)
def engine_endpoints_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """An engine pod became ready or unready: the router's endpoint lists follow (ConfigMap)."""
    name = (body.metadata.labels or {}).get("app.kubernetes.io/instance")
    if name:
        _reconcile_parent(body, name, None, memo, logger)


def _reconcile_parent(
    body: kopf.Body, name: str, uid: str | None, memo: kopf.Memo, logger: kopf.Logger
) -> None:
    try:
        _reconcile_and_report(body.metadata.namespace, name, uid, memo)
    except (TransientError, PermanentApiError, WaitingError, kopf.PermanentError) as exc:
        # The InferenceService's own handler retries with backoff; the next child event retries too.
        logger.warning(f"reconcile of {name} after a {body.get('kind', 'child')} change failed: {exc}")
