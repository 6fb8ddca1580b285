"""The rollout planner: a pure state machine from what was observed to replicas and weights.

Inputs: spec.rollout, the revision the spec asks for (`target`), the desired total replicas,
the revisions observed (their Deployments' replicas and ready pods, Unschedulable pods, crash
loops), a new analysis check if one was due, manual commands (annotations), the time, and the
previous `status.rollout`. Output: replicas, weight and phase per revision, the new
`status.rollout`, Events, and when to look again. Everything it remembers is in the status it
returns, so a restarted operator carries on from the object alone.
"""

from __future__ import annotations

from kvpilot.operator.api import RolloutStatus
from kvpilot.operator.api.validation import duration_seconds
from kvpilot.operator.rollout.analysis import receives_traffic
from kvpilot.operator.rollout.state import (
    Commands,
    Event,
    ObservedRevision,
    RevisionPlan,
    RolloutInputs,
    RolloutPlan,
    Tick,
    canary_steps,
    finish,
    parse_time,
    rfc3339,
    steady,
)
from kvpilot.operator.rollout.strategies import blue_green, canary, rolling

__all__ = [
    "Commands",
    "Event",
    "ObservedRevision",
    "RevisionPlan",
    "RolloutInputs",
    "RolloutPlan",
    "canary_steps",
    "parse_time",
    "plan_rollout",
    "rfc3339",
]


def plan_rollout(inputs: RolloutInputs) -> RolloutPlan:
    previous = inputs.previous
    now = rfc3339(inputs.now)
    if previous is None:
        status = RolloutStatus(phase="Promoted", revision=inputs.target, stable_revision=inputs.target)
        tick = Tick(inputs, status)
        tick.transition("Promoted", "FirstRevision", f"revision {inputs.target} is the first", started_at=now)
        return steady(tick)
    tick = Tick(inputs, previous)
    if inputs.target != previous.revision:
        _start(tick, previous)
    if tick.status.revision == tick.status.stable_revision:
        return steady(tick)
    if tick.status.phase == "RolledBack":
        return _rolled_back(tick)
    if tick.status.phase == "Failed":
        return _held(tick)
    return _progress(tick)


def _start(tick: Tick, previous: RolloutStatus) -> None:
    """A new target: a new rollout from the stable revision; a revision in the middle is retired."""
    inputs, now = tick.inputs, rfc3339(tick.inputs.now)
    stable = previous.stable_revision
    if previous.phase == "Promoted":
        stable = previous.revision
    if inputs.target == stable:
        tick.status = tick.status.model_copy(update={"revision": stable})
        tick.transition(
            "Promoted",
            "BackToStable",
            f"the spec is back at stable revision {stable}",
            canary_weight=0,
            step=None,
        )
        return
    message = f"from {stable} to {inputs.target} ({inputs.spec.strategy})"
    if previous.revision not in (stable, inputs.target) and previous.phase in ("Progressing", "Paused"):
        message += f"; {previous.revision}, still rolling out, is retired"
    tick.status = RolloutStatus(
        phase="Progressing",
        revision=inputs.target,
        stable_revision=stable,
        strategy=inputs.spec.strategy,
        step=0 if inputs.spec.strategy == "Canary" else None,
        capacity_mode="InPlace" if inputs.spec.capacity == "InPlace" else "Surge",
        capacity_reason="spec.rollout.capacity is InPlace" if inputs.spec.capacity == "InPlace" else "",
        started_at=now,
        progress_at=now,
        history=previous.history,
    )
    tick.transition("Progressing", "RolloutStarted", message)


def _rolled_back(tick: Tick) -> RolloutPlan:
    stable, failed = tick.status.stable_revision, tick.status.revision
    return finish(
        tick, {stable: (tick.inputs.total, 100), failed: (0, 0)}, {stable: "Active", failed: "Failed"}
    )


def _held(tick: Tick) -> RolloutPlan:
    """Failed without autoRollback: replicas and weights stay where they were; an abort still rolls back."""
    status = tick.status
    if tick.commands.abort == status.revision:
        return _fail(tick, "Aborted", "aborted by `kvpilot rollout abort`", rollback=True)
    stable, new = status.stable_revision, status.revision
    serving = {
        stable: (tick.observed(stable).replicas, 100 - status.canary_weight),
        new: (tick.observed(new).replicas, status.canary_weight),
    }
    return finish(tick, serving, {stable: "Active", new: "Failed"})


def _fail(tick: Tick, reason: str, message: str, rollback: bool) -> RolloutPlan:
    if rollback:
        tick.transition(
            "RolledBack",
            reason,
            f"{message}; all traffic back to {tick.status.stable_revision}",
            warning=True,
            canary_weight=0,
        )
        return _rolled_back(tick)
    tick.transition("Failed", reason, f"{message}; held (autoRollback is off)", warning=True)
    return _held(tick)


def _progress(tick: Tick) -> RolloutPlan:
    inputs, status = tick.inputs, tick.status
    spec, new = inputs.spec, tick.observed(status.revision)
    rollback = spec.auto_rollback
    if tick.commands.abort == status.revision:
        return _fail(tick, "Aborted", "aborted by `kvpilot rollout abort`", rollback=True)
    _track_progress(tick, new)
    _maybe_go_in_place(tick, new)
    failure = _analysis_failure(tick)
    if failure:
        return _fail(tick, "AnalysisFailed", failure, rollback)
    deadline = duration_seconds(spec.progress_deadline)
    # The deadline runs only while the new revision is short of the pods it was given.
    stuck_for = tick.since(tick.status.progress_at) if new.ready < max(new.replicas, 1) else 0.0
    if stuck_for >= deadline:
        detail = new.failure or (
            f"Unschedulable: {new.unschedulable_message}" if new.unschedulable_since else ""
        )
        message = (
            f"revision {status.revision} made no progress for {spec.progress_deadline} ({new.ready} ready)"
        )
        return _fail(
            tick, "ProgressDeadlineExceeded", f"{message}{': ' + detail if detail else ''}", rollback
        )
    tick.wait(deadline - stuck_for)
    if tick.status.strategy == "Canary":
        return canary(tick)
    if tick.status.strategy == "BlueGreen":
        return blue_green(tick)
    return rolling(tick)


def _track_progress(tick: Tick, new: ObservedRevision) -> None:
    """progressAt moves whenever the new revision gains a ready replica (and when it is asked for
    more pods, see state.finish), and all along a pause (spec.rollout.paused), as a Deployment's
    progress deadline is not checked while it is paused: it counts again from the resume."""
    update: dict = {"ready_replicas": new.ready}
    if new.ready > tick.status.ready_replicas or tick.inputs.spec.paused:
        update["progress_at"] = rfc3339(tick.inputs.now)
    tick.status = tick.status.model_copy(update=update)


def _maybe_go_in_place(tick: Tick, new: ObservedRevision) -> None:
    status, spec = tick.status, tick.inputs.spec
    if status.capacity_mode != "Surge" or spec.capacity != "Auto" or new.unschedulable_since is None:
        return
    pending_for = (tick.inputs.now - new.unschedulable_since).total_seconds()
    timeout = duration_seconds(spec.capacity_timeout)
    if pending_for < timeout:
        tick.wait(timeout - pending_for)
        return
    reason = (
        f"a pod of {status.revision} was Unschedulable for {int(pending_for)}s: {new.unschedulable_message}"
    )
    tick.transition(
        status.phase,
        "CapacityInPlace",
        f"switching to in-place, one pod at a time ({reason})",
        capacity_mode="InPlace",
        capacity_reason=reason,
        progress_at=rfc3339(tick.inputs.now),
    )


def _analysis_failure(tick: Tick) -> str:
    """Record a new check; the failed check's message once failureLimit checks failed in a row."""
    result, analysis = tick.inputs.analysis, tick.inputs.spec.analysis
    if analysis is None:
        return ""
    if result is None:
        last = tick.status.last_analysis
        if receives_traffic(tick.status) and last is not None:
            tick.wait(duration_seconds(analysis.interval) - tick.since(last.time))
        return ""
    failed = (
        tick.status.failed_checks + 1
        if result.passed is False
        else 0
        if result.passed
        else tick.status.failed_checks
    )
    tick.status = tick.status.model_copy(update={"last_analysis": result, "failed_checks": failed})
    tick.wait(duration_seconds(analysis.interval))
    if failed >= analysis.failure_limit:
        return f"{failed} failed analysis checks in a row, the last: {result.message}"
    return ""
