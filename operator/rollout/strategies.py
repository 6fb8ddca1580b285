"""How each strategy moves the traffic once a rollout is under way (pure): Canary steps,
Rolling pod by pod, BlueGreen preview then switch."""

from __future__ import annotations

import datetime

from kvpilot.operator.api import RolloutStep
from kvpilot.operator.api.rollout import MANUAL_PAUSE, RevisionPhase
from kvpilot.operator.api.validation import duration_seconds
from kvpilot.operator.rollout.replicas import new_revision_share, shift_replicas, split_replicas
from kvpilot.operator.rollout.state import (
    PROMOTE_FULL,
    RolloutPlan,
    Tick,
    canary_steps,
    finish,
    parse_time,
    rfc3339,
    steady,
)


def _promoted(tick: Tick, how: str) -> RolloutPlan:
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
    return steady(tick)


def _serving(tick: Tick, new_replicas: int, stable_replicas: int) -> dict[str, tuple[int, int]]:
    status = tick.status
    return {
        status.stable_revision: (stable_replicas, 100 - status.canary_weight),
        status.revision: (new_replicas, status.canary_weight),
    }


def _canary_phases(tick: Tick) -> dict[str, RevisionPhase]:
    return {tick.status.stable_revision: "Active", tick.status.revision: "Canary"}


def _promote_requested(tick: Tick, step: int | None) -> bool:
    given = tick.commands.promote
    return given is not None and given in (
        f"{tick.status.revision}/{step or 0}",
        f"{tick.status.revision}/{PROMOTE_FULL}",
    )


def canary(tick: Tick) -> RolloutPlan:
    inputs = tick.inputs
    steps = canary_steps(inputs.spec)
    last = len(steps) - 1
    if tick.commands.promote == f"{tick.status.revision}/{PROMOTE_FULL}" and (tick.status.step or 0) < last:
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
    return finish(tick, _serving(tick, shift.new, shift.stable), _canary_phases(tick))


def _step_done(tick: Tick, step: RolloutStep, index: int, label: str) -> bool:
    """Whether the step's pause is over (or a promote skips it); otherwise report the wait."""
    promoted = _promote_requested(tick, index)
    if tick.inputs.spec.paused and not promoted:
        tick.note("Paused", "PausedBySpec", f"{label}: spec.rollout.paused is true")
        return False
    if step.pause == MANUAL_PAUSE and not promoted:
        tick.note("Paused", "AwaitingPromote", f"{label}: waiting for `kvpilot rollout promote`")
        return False
    if step.pause and step.pause != MANUAL_PAUSE and not promoted:
        remaining = duration_seconds(step.pause) - tick.since(tick.status.step_reached_at)
        if remaining > 0:
            until = rfc3339(
                parse_time(tick.status.step_reached_at)
                + datetime.timedelta(seconds=duration_seconds(step.pause))
            )
            tick.note("Progressing", "StepPause", f"{label}: pausing {step.pause}, until {until}")
            tick.wait(remaining)
            return False
    return True


def _goal(total: int, weight: int, mode: str) -> dict[str, int]:
    goal = split_replicas(total, {"stable": 100 - weight})
    goal["new"] = new_revision_share(total, weight)
    if mode == "InPlace":
        goal["stable"] = max(total - goal["new"], 0)
    return goal


def rolling(tick: Tick) -> RolloutPlan:
    total, status = tick.inputs.total, tick.status
    new, stable = tick.observed(status.revision), tick.observed(status.stable_revision)
    wanted = new_revision_share(total, 100)
    if tick.inputs.spec.paused:
        tick.note(
            "Paused",
            "PausedBySpec",
            f"{new.ready}/{wanted} replicas of {status.revision} ready; spec.rollout.paused is true",
        )
        return finish(tick, _serving(tick, new.replicas, stable.replicas), _canary_phases(tick))
    if new.ready >= wanted:
        return _promoted(tick, f"{new.ready}/{wanted} replicas ready")
    shift = shift_replicas(
        total,
        {"new": wanted, "stable": 0},
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
        f"{new.ready}/{wanted} replicas of {status.revision} ready ({status.capacity_mode}){blocked}",
    )
    return finish(tick, _serving(tick, shift.new, shift.stable), _canary_phases(tick))


def blue_green(tick: Tick) -> RolloutPlan:
    total, status = tick.inputs.total, tick.status
    new = tick.observed(status.revision)
    preview = new_revision_share(total, 100)
    if new.ready >= preview and _promote_requested(tick, status.step):
        return _promoted(tick, "promoted from preview")
    if new.ready < preview:
        tick.note(
            "Progressing",
            "PreviewScaling",
            f"{new.ready}/{preview} replicas of {status.revision} ready at weight 0",
        )
    else:
        tick.note(
            "Paused",
            "AwaitingPromote",
            f"preview {status.revision} ready: waiting for `kvpilot rollout promote`",
        )
    return finish(tick, _serving(tick, preview, total), _canary_phases(tick))
