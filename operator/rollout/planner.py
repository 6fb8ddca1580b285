"""The rollout planner: a pure state machine from what was observed to replicas and weights.

Inputs: spec.rollout, the revision the spec asks for (`target`), the desired total replicas,
the revisions observed (their Deployments' replicas and ready pods, Unschedulable pods, crash
loops), a new analysis check if one was due, manual commands (annotations), the time, and the
previous `status.rollout`. Output: replicas, weight and phase per revision, the new
`status.rollout`, Events, and when to look again. Everything it remembers is in the status it
returns, so a restarted operator carries on from the object alone.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from kvpilot.operator.api import AnalysisResult, HistoryEntry, RolloutSpec, RolloutStatus, RolloutStep
from kvpilot.operator.api.rollout import MANUAL_PAUSE, RevisionPhase
from kvpilot.operator.api.validation import parse_duration
from kvpilot.operator.rollout.replicas import shift_replicas, split_replicas

HISTORY_LIMIT = 10
PROMOTE_FULL = "full"


@dataclass(frozen=True)
class ObservedRevision:
    """A revision's Deployment and pods as observed."""

    replicas: int = 0  # the Deployment's spec.replicas
    ready: int = 0
    unschedulable_since: datetime.datetime | None = None  # oldest pod Pending with Unschedulable
    unschedulable_message: str = ""
    failure: str = ""  # e.g. "CrashLoopBackOff: container server exited 1 (3 restarts)"


@dataclass(frozen=True)
class Commands:
    """Manual commands from annotations (`kvpilot rollout promote|abort`): each names the
    revision (and step) it was given for, so a stale one does nothing."""

    promote: str | None = None  # "<revision>/<step>" or "<revision>/full"
    abort: str | None = None  # "<revision>"


@dataclass(frozen=True)
class RolloutInputs:
    spec: RolloutSpec
    target: str
    total: int
    revisions: dict[str, ObservedRevision]
    now: datetime.datetime
    previous: RolloutStatus | None = None
    analysis: AnalysisResult | None = None
    commands: Commands = field(default_factory=Commands)


@dataclass(frozen=True)
class RevisionPlan:
    replicas: int
    weight: int
    phase: RevisionPhase


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class RolloutPlan:
    revisions: dict[str, RevisionPlan]  # every revision to keep, with its replicas and weight
    delete: list[str]  # retired revisions already at zero: their Deployments go
    status: RolloutStatus
    events: list[Event]
    requeue_after: float | None  # seconds until a pause, a deadline or an analysis is due


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def canary_steps(spec: RolloutSpec) -> list[RolloutStep]:
    """The spec's steps, ending at weight 100 (appended when the last step stops short)."""
    steps = list(spec.steps)
    if not steps or steps[-1].weight < 100:
        steps.append(RolloutStep(weight=100))
    return steps


class _Tick:
    """One planning pass: status and events accumulate here, then become the RolloutPlan."""

    def __init__(self, inputs: RolloutInputs, status: RolloutStatus) -> None:
        self.inputs = inputs
        self.status = status
        self.events: list[Event] = []
        self.waits: list[float] = []

    def observed(self, revision: str) -> ObservedRevision:
        return self.inputs.revisions.get(revision, ObservedRevision())

    def transition(self, phase: str, reason: str, message: str, warning: bool = False, **changes) -> None:
        """Enter a phase (or record a step within one): history, an Event."""
        now = rfc3339(self.inputs.now)
        entry = HistoryEntry(
            time=now, phase=phase, revision=self.status.revision, reason=reason, message=message
        )
        history = [*self.status.history, entry][-HISTORY_LIMIT:]
        self.status = self.status.model_copy(
            update={"phase": phase, "reason": reason, "message": message, "history": history, **changes}
        )
        self.events.append(Event("Warning" if warning else "Normal", reason, message))

    def note(self, phase: str, reason: str, message: str) -> None:
        """Report the state; only a change of phase is a transition (history, Event)."""
        if self.status.phase != phase:
            self.transition(phase, reason, message)
        else:
            self.status = self.status.model_copy(update={"reason": reason, "message": message})

    def wait(self, seconds: float) -> None:
        self.waits.append(max(1.0, seconds))

    def since(self, text: str | None) -> float:
        return 0.0 if text is None else (self.inputs.now - parse_time(text)).total_seconds()


def plan_rollout(inputs: RolloutInputs) -> RolloutPlan:
    previous = inputs.previous
    now = rfc3339(inputs.now)
    if previous is None:
        status = RolloutStatus(phase="Promoted", revision=inputs.target, stable_revision=inputs.target)
        tick = _Tick(inputs, status)
        tick.transition("Promoted", "FirstRevision", f"revision {inputs.target} is the first", started_at=now)
        return _steady(tick)
    tick = _Tick(inputs, previous)
    if inputs.target != previous.revision:
        _start(tick, previous)
    if tick.status.revision == tick.status.stable_revision:
        return _steady(tick)
    if tick.status.phase == "RolledBack":
        return _rolled_back(tick)
    if tick.status.phase == "Failed":
        return _held(tick)
    return _progress(tick)


def _start(tick: _Tick, previous: RolloutStatus) -> None:
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


def _retired(tick: _Tick, keep: set[str]) -> tuple[dict[str, int], list[str]]:
    """Revisions outside `keep`: scaled to 0 first, deleted once they are at 0."""
    scale_down, delete = {}, []
    for name, observed in tick.inputs.revisions.items():
        if name in keep:
            continue
        if observed.replicas == 0 and observed.ready == 0:
            delete.append(name)
        else:
            scale_down[name] = 0
    return scale_down, sorted(delete)


def _finish(
    tick: _Tick, serving: dict[str, tuple[int, int]], phases: dict[str, RevisionPhase]
) -> RolloutPlan:
    scale_down, delete = _retired(tick, set(serving))
    revisions = {
        name: RevisionPlan(replicas, weight, phases[name]) for name, (replicas, weight) in serving.items()
    }
    revisions.update({name: RevisionPlan(0, 0, "Retired") for name in scale_down})
    requeue = min(tick.waits) if tick.waits else None
    return RolloutPlan(revisions, delete, tick.status, tick.events, requeue)


def _steady(tick: _Tick) -> RolloutPlan:
    stable = tick.status.stable_revision
    return _finish(tick, {stable: (tick.inputs.total, 100)}, {stable: "Active"})


def _rolled_back(tick: _Tick) -> RolloutPlan:
    stable, failed = tick.status.stable_revision, tick.status.revision
    return _finish(
        tick, {stable: (tick.inputs.total, 100), failed: (0, 0)}, {stable: "Active", failed: "Failed"}
    )


def _held(tick: _Tick) -> RolloutPlan:
    """Failed without autoRollback: replicas and weights stay where they were; an abort still rolls back."""
    status = tick.status
    if tick.inputs.commands.abort == status.revision:
        return _fail(tick, "Aborted", "aborted by `kvpilot rollout abort`", rollback=True)
    stable, new = status.stable_revision, status.revision
    serving = {
        stable: (tick.observed(stable).replicas, 100 - status.canary_weight),
        new: (tick.observed(new).replicas, status.canary_weight),
    }
    return _finish(tick, serving, {stable: "Active", new: "Failed"})


def _fail(tick: _Tick, reason: str, message: str, rollback: bool) -> RolloutPlan:
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


def _progress(tick: _Tick) -> RolloutPlan:
    inputs, status = tick.inputs, tick.status
    spec, new = inputs.spec, tick.observed(status.revision)
    rollback = spec.auto_rollback
    if inputs.commands.abort == status.revision:
        return _fail(tick, "Aborted", "aborted by `kvpilot rollout abort`", rollback=True)
    _track_progress(tick, new)
    _maybe_go_in_place(tick, new)
    failure = _analysis_failure(tick)
    if failure:
        return _fail(tick, "AnalysisFailed", failure, rollback)
    deadline = parse_duration(spec.progress_deadline)
    stuck_for = tick.since(tick.status.progress_at)
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
        return _canary(tick)
    if tick.status.strategy == "BlueGreen":
        return _blue_green(tick)
    return _rolling(tick)


def _track_progress(tick: _Tick, new: ObservedRevision) -> None:
    """progressAt moves whenever the new revision gains a ready replica or has all it was given."""
    gained = new.ready > tick.status.ready_replicas
    complete = new.replicas > 0 and new.ready >= new.replicas
    update: dict = {"ready_replicas": new.ready}
    if gained or complete:
        update["progress_at"] = rfc3339(tick.inputs.now)
    tick.status = tick.status.model_copy(update=update)


def _maybe_go_in_place(tick: _Tick, new: ObservedRevision) -> None:
    status, spec = tick.status, tick.inputs.spec
    if status.capacity_mode != "Surge" or spec.capacity != "Auto" or new.unschedulable_since is None:
        return
    pending_for = (tick.inputs.now - new.unschedulable_since).total_seconds()
    timeout = parse_duration(spec.capacity_timeout)
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


def _analysis_failure(tick: _Tick) -> str:
    """Record a new check; the failed check's message once failureLimit checks failed in a row."""
    result, analysis = tick.inputs.analysis, tick.inputs.spec.analysis
    if analysis is None:
        return ""
    if result is None:
        last = tick.status.last_analysis
        if tick.status.canary_weight > 0 and last is not None:
            tick.wait(parse_duration(analysis.interval) - tick.since(last.time))
        return ""
    failed = (
        tick.status.failed_checks + 1
        if result.passed is False
        else 0
        if result.passed
        else tick.status.failed_checks
    )
    tick.status = tick.status.model_copy(update={"last_analysis": result, "failed_checks": failed})
    tick.wait(parse_duration(analysis.interval))
    if failed >= analysis.failure_limit:
        return f"{failed} failed analysis checks in a row, the last: {result.message}"
    return ""


def _promoted(tick: _Tick, how: str) -> RolloutPlan:
    revision = tick.status.revision
    tick.transition(
        "Promoted",
        "Promoted",
        f"revision {revision} is stable ({how})",
        stable_revision=revision,
        canary_weight=0,
        step=None,
        step_reached_at=None,
    )
    return _steady(tick)


def _serving(tick: _Tick, new_replicas: int, stable_replicas: int) -> dict[str, tuple[int, int]]:
    status = tick.status
    return {
        status.stable_revision: (stable_replicas, 100 - status.canary_weight),
        status.revision: (new_replicas, status.canary_weight),
    }


def _canary_phases(tick: _Tick) -> dict[str, RevisionPhase]:
    return {tick.status.stable_revision: "Active", tick.status.revision: "Canary"}


def _promote_requested(tick: _Tick, step: int | None) -> bool:
    given = tick.inputs.commands.promote
    return given is not None and given in (
        f"{tick.status.revision}/{step or 0}",
        f"{tick.status.revision}/{PROMOTE_FULL}",
    )


def _canary(tick: _Tick) -> RolloutPlan:
    inputs = tick.inputs
    steps = canary_steps(inputs.spec)
    last = len(steps) - 1
    if inputs.commands.promote == f"{tick.status.revision}/{PROMOTE_FULL}" and (tick.status.step or 0) < last:
        tick.transition(
            tick.status.phase,
            "PromotedFull",
            "skipping to the last step (`kvpilot rollout promote --full`)",
            step=last,
            step_reached_at=None,
        )
    new, stable = tick.observed(tick.status.revision), tick.observed(tick.status.stable_revision)
    for _ in range(len(steps)):
        step = min(tick.status.step or 0, last)
        weight = steps[step].weight
        goal = _goal(inputs.total, weight, tick.status.capacity_mode)
        shift = shift_replicas(
            inputs.total,
            goal,
            new.replicas,
            new.ready,
            stable.ready,
            tick.status.capacity_mode,
            one_at_a_time=False,
        )
        label = f"step {step + 1}/{len(steps)} ({weight}%)"
        if new.ready < goal["new"]:
            blocked = f"; {shift.blocked}" if shift.blocked else ""
            tick.note(
                "Progressing",
                "WaitingForReplicas",
                f"{label}: {new.ready}/{goal['new']} replicas of {tick.status.revision} ready{blocked}",
            )
            break
        if tick.status.step_reached_at is None:
            tick.transition(
                "Progressing",
                "StepReached",
                f"{label}: {weight}% of new requests to {tick.status.revision}",
                canary_weight=weight,
                step_reached_at=rfc3339(inputs.now),
            )
        if not _step_done(tick, steps[step], step, label):
            break
        if step == last:
            return _promoted(tick, f"after {len(steps)} steps")
        tick.status = tick.status.model_copy(update={"step": step + 1, "step_reached_at": None})
    return _finish(tick, _serving(tick, shift.new, shift.stable), _canary_phases(tick))


def _step_done(tick: _Tick, step: RolloutStep, index: int, label: str) -> bool:
    """Whether the step's pause is over (or a promote skips it); otherwise report the wait."""
    promoted = _promote_requested(tick, index)
    if tick.inputs.spec.paused and not promoted:
        tick.note("Paused", "PausedBySpec", f"{label}: spec.rollout.paused is true")
        return False
    if step.pause == MANUAL_PAUSE and not promoted:
        tick.note("Paused", "AwaitingPromote", f"{label}: waiting for `kvpilot rollout promote`")
        return False
    if step.pause and step.pause != MANUAL_PAUSE and not promoted:
        remaining = parse_duration(step.pause) - tick.since(tick.status.step_reached_at)
        if remaining > 0:
            tick.note("Progressing", "StepPause", f"{label}: pausing, {int(remaining)}s left of {step.pause}")
            tick.wait(remaining)
            return False
    return True


def _goal(total: int, weight: int, mode: str) -> dict[str, int]:
    goal = split_replicas(total, {"new": weight, "stable": 100 - weight})
    if mode == "InPlace":
        goal["stable"] = total - goal["new"]
    return goal


def _rolling(tick: _Tick) -> RolloutPlan:
    total, status = tick.inputs.total, tick.status
    new, stable = tick.observed(status.revision), tick.observed(status.stable_revision)
    if tick.inputs.spec.paused:
        tick.note(
            "Paused",
            "PausedBySpec",
            f"{new.ready}/{total} replicas of {status.revision} ready; spec.rollout.paused is true",
        )
        return _finish(tick, _serving(tick, new.replicas, stable.replicas), _canary_phases(tick))
    if new.ready >= total:
        return _promoted(tick, f"{new.ready}/{total} replicas ready")
    shift = shift_replicas(
        total,
        {"new": total, "stable": 0},
        new.replicas,
        new.ready,
        stable.ready,
        status.capacity_mode,
        one_at_a_time=True,
    )
    serving_new, serving_stable = min(new.ready, shift.new), min(stable.ready, shift.stable)
    serving = serving_new + serving_stable
    weight = round(100 * serving_new / serving) if serving else 0
    tick.status = tick.status.model_copy(update={"canary_weight": weight})
    blocked = f"; {shift.blocked}" if shift.blocked else ""
    tick.note(
        "Progressing",
        "RollingUpdate",
        f"{new.ready}/{total} replicas of {status.revision} ready ({status.capacity_mode}){blocked}",
    )
    return _finish(tick, _serving(tick, shift.new, shift.stable), _canary_phases(tick))


def _blue_green(tick: _Tick) -> RolloutPlan:
    total, status = tick.inputs.total, tick.status
    new = tick.observed(status.revision)
    if new.ready >= total and _promote_requested(tick, status.step):
        return _promoted(tick, "promoted from preview")
    if new.ready < total:
        tick.note(
            "Progressing",
            "PreviewScaling",
            f"{new.ready}/{total} replicas of {status.revision} ready at weight 0",
        )
    else:
        tick.note(
            "Paused",
            "AwaitingPromote",
            f"preview {status.revision} ready: waiting for `kvpilot rollout promote`",
        )
    return _finish(tick, _serving(tick, total, total), _canary_phases(tick))
