"""Test support: a tiny cluster for the rollout planner. Deployments get the replicas the plan
asks for; pods take free GPU slots (oldest revision first), beyond them they stay Pending and
Unschedulable; a broken revision's pods run but never become ready. The status goes through
JSON between ticks, as it does through the API (a restarted operator sees only that)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from kvpilot.operator.api import AnalysisResult, RolloutSpec, RolloutStatus
from kvpilot.operator.rollout.planner import (
    Commands,
    ObservedRevision,
    RolloutInputs,
    RolloutPlan,
    plan_rollout,
)
from kvpilot.operator.rollout.state import command_value
from kvpilot.operator.status import status_patch

T0 = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386, as the API server applies a merge patch: null removes a key."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_patch(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class Sim:
    spec: RolloutSpec
    total: int
    capacity: int | None = None  # GPU slots; None: room for every pod
    broken: set[str] = field(default_factory=set)
    now: datetime.datetime = T0
    status: RolloutStatus | None = None
    replicas: dict[str, int] = field(
        default_factory=dict
    )  # revision -> Deployment replicas (in creation order)
    ready: dict[str, int] = field(default_factory=dict)
    pending_since: dict[str, datetime.datetime] = field(default_factory=dict)
    min_ready_seen: int | None = None  # fewest ready pods over all revisions after the first tick
    stored: dict = field(default_factory=dict)  # status.rollout as the API server holds it

    def observed(self) -> dict[str, ObservedRevision]:
        return {
            name: ObservedRevision(
                replicas=replicas,
                ready=self.ready.get(name, 0),
                unschedulable_since=self.pending_since.get(name),
                unschedulable_message="0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
                if name in self.pending_since
                else "",
                failure="CrashLoopBackOff: container server exited 1" if name in self.broken else "",
            )
            for name, replicas in self.replicas.items()
        }

    def tick(
        self, target: str, analysis: AnalysisResult | None = None, commands: Commands | None = None
    ) -> RolloutPlan:
        plan = plan_rollout(
            RolloutInputs(
                spec=self.spec,
                target=target,
                total=self.total,
                revisions=self.observed(),
                now=self.now,
                previous=self.status,
                analysis=analysis,
                commands=commands or Commands(),
            )
        )
        # Written as the operator writes it: a JSON merge patch onto what the API stored.
        written = plan.status.model_dump(by_alias=True, mode="json", exclude_none=True)
        self.stored = merge_patch(self.stored, status_patch(written, self.stored))
        self.status = RolloutStatus.model_validate(self.stored)
        for name, revision in plan.revisions.items():
            self.replicas[name] = revision.replicas
        for name in plan.delete:
            del self.replicas[name]
            self.ready.pop(name, None)
        self.settle()
        return plan

    def commands(self, promote: str | None = None, abort: str | None = None) -> Commands:
        """Commands as `kvpilot rollout promote|abort` gives them: for the rollout in the status."""
        started = self.status.started_at
        return Commands(
            promote=command_value(promote, started) if promote else None,
            abort=command_value(abort, started) if abort else None,
        )

    def settle(self) -> None:
        """Pods start: scale-downs free their slots first, then each revision takes what is left."""
        free = self.capacity if self.capacity is not None else sum(self.replicas.values())
        for name, replicas in self.replicas.items():
            scheduled = min(replicas, max(free, 0))
            free -= scheduled
            self.ready[name] = 0 if name in self.broken else scheduled
            if scheduled < replicas:
                self.pending_since.setdefault(name, self.now)
            else:
                self.pending_since.pop(name, None)
        total_ready = sum(self.ready.values())
        self.min_ready_seen = (
            total_ready if self.min_ready_seen is None else min(self.min_ready_seen, total_ready)
        )

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)

    def row(self, plan: RolloutPlan) -> tuple:
        """(phase, step, canaryWeight, replicas per revision, weight per revision) after a tick."""
        status = plan.status
        return (
            status.phase,
            status.step,
            status.canary_weight,
            {name: p.replicas for name, p in plan.revisions.items()},
            {name: p.weight for name, p in plan.revisions.items()},
        )
