"""The rollout planner's inputs and outputs, and one planning pass (`Tick`) that gathers the
new status, Events and wake-up times."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from kvpilot.operator.api import AnalysisResult, HistoryEntry, RolloutSpec, RolloutStatus, RolloutStep
from kvpilot.operator.api.rollout import RevisionPhase

HISTORY_LIMIT = 10
# Manual commands (`kvpilot rollout promote|abort`), as annotations on the InferenceService.
PROMOTE_ANNOTATION = "kvpilot.dev/promote"
ABORT_ANNOTATION = "kvpilot.dev/abort"
PROMOTE_FULL = "full"


@dataclass(frozen=True)
class ObservedRevision:
    """A revision's Deployment and pods as observed."""

    replicas: int = 0  # the Deployment's spec.replicas
    ready: int = 0
    unschedulable_since: datetime.datetime | None = None  # oldest pod Pending with Unschedulable
    unschedulable_message: str = ""
    failure: str = ""  # e.g. "CrashLoopBackOff: container server exited 1 (3 restarts)"


def command_value(command: str, started_at: str) -> str:
    """An annotation's value: the command (`<revision>/<step>`, `<revision>/full` or
    `<revision>`) and the rollout it is given for, named by its `status.rollout.startedAt`."""
    return f"{command}@{started_at}"


def _given_for(value: str | None, started_at: str | None) -> str | None:
    command, scoped, rollout = (value or "").rpartition("@")
    return command if scoped and started_at is not None and rollout == started_at else None


@dataclass(frozen=True)
class Commands:
    """Manual commands from annotations (`kvpilot rollout promote|abort`), as written (see
    `command_value`): each names the revision (and step) and the rollout it was given for, so
    a stale one does nothing."""

    promote: str | None = None  # "<revision>/<step>@<startedAt>" or "<revision>/full@<startedAt>"
    abort: str | None = None  # "<revision>@<startedAt>"

    @classmethod
    def from_annotations(cls, annotations: dict[str, str] | None) -> Commands:
        annotations = annotations or {}
        return cls(promote=annotations.get(PROMOTE_ANNOTATION), abort=annotations.get(ABORT_ANNOTATION))

    def for_rollout(self, started_at: str | None) -> Commands:
        """The commands given for the rollout that began at `started_at`, without that scope
        (`b/0`, `b/full`, `b`). Nothing removes an annotation, and a revision hash comes back
        when the spec does (abort b, set the spec back to a, then to b again): named by its
        revision alone, the old abort would end the retry at once, a leftover `b/full` skip
        every step of it. The start time tells one rollout of b from the next; a value without
        one names no rollout and does nothing."""
        return Commands(
            promote=_given_for(self.promote, started_at), abort=_given_for(self.abort, started_at)
        )


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


def autoscaled_revision(rollout: RolloutStatus | None) -> str | None:
    """The revision whose Deployment an autoscaler scales itself: the stable one while it serves
    alone. None while a rollout runs or a rolled-back revision is kept (and before the first
    reconcile): then the rollout planner sets every revision's replicas, sharing the autoscaler's
    total by weight, so `replicas` has one owner at any time."""
    if (
        rollout is None
        or rollout.phase in ("Progressing", "Paused")
        or rollout.revision != rollout.stable_revision
    ):
        return None
    return rollout.stable_revision


def canary_steps(spec: RolloutSpec) -> list[RolloutStep]:
    """The spec's steps, ending at weight 100 (appended when the last step stops short)."""
    steps = list(spec.steps)
    if not steps or steps[-1].weight < 100:
        steps.append(RolloutStep(weight=100))
    return steps


class Tick:
    """One planning pass: status and events accumulate here, then become the RolloutPlan."""

    def __init__(self, inputs: RolloutInputs, status: RolloutStatus) -> None:
        self.inputs = inputs
        self.status = status
        self.events: list[Event] = []
        self.waits: list[float] = []

    @property
    def commands(self) -> Commands:
        """The manual commands given for this very rollout (`Commands.for_rollout`); read after a
        new target started its rollout, so none given for an earlier one applies."""
        return self.inputs.commands.for_rollout(self.status.started_at)

    def observed(self, revision: str) -> ObservedRevision:
        return self.inputs.revisions.get(revision, ObservedRevision())

    def transition(
        self, phase: str, reason: str, message: str, warning: bool = False, **changes: Any
    ) -> None:
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


def retired(tick: Tick, keep: set[str]) -> tuple[dict[str, int], list[str]]:
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


def finish(tick: Tick, serving: dict[str, tuple[int, int]], phases: dict[str, RevisionPhase]) -> RolloutPlan:
    scale_down, delete = retired(tick, set(serving))
    revisions = {
        name: RevisionPlan(replicas, weight, phases[name]) for name, (replicas, weight) in serving.items()
    }
    revisions.update({name: RevisionPlan(0, 0, "Retired") for name in scale_down})
    new = tick.status.revision
    if (
        tick.status.phase in ("Progressing", "Paused")
        and revisions[new].replicas > tick.observed(new).replicas
    ):
        # The new revision is asked for more pods: the progress deadline runs from now.
        tick.status = tick.status.model_copy(update={"progress_at": rfc3339(tick.inputs.now)})
    requeue = min(tick.waits) if tick.waits else None
    return RolloutPlan(revisions, delete, tick.status, tick.events, requeue)


def steady(tick: Tick) -> RolloutPlan:
    stable = tick.status.stable_revision
    return finish(tick, {stable: (tick.inputs.total, 100)}, {stable: "Active"})
