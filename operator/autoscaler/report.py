"""status.autoscaling from a decision (pure): HPA's conditions, the last decisions and their reasons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpilot.operator.api.status import AutoscalingStatus, ScalingDecision
from kvpilot.operator.autoscaler.decision import Decision
from kvpilot.operator.status import build_conditions

ABLE_TO_SCALE, SCALING_ACTIVE, SCALING_LIMITED = "AbleToScale", "ScalingActive", "ScalingLimited"
HISTORY_LENGTH = 10


@dataclass(frozen=True)
class ScaleWrite:
    """How writing the replicas went (AbleToScale)."""

    ok: bool
    reason: str  # CamelCase
    message: str


def autoscaling_status(
    decision: Decision,
    metric: str,
    current: int,
    write: ScaleWrite,
    previous: dict[str, Any],
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """The new status.autoscaling; `previous` is the last one written (or {})."""
    scaled = decision.desired != current and write.ok
    history = list(previous.get("history") or [])
    if scaled:
        value = None if decision.value is None else round(decision.value, 3)
        entry = ScalingDecision.model_validate(
            {"time": now, "from": current, "to": decision.desired, "mode": decision.mode, "value": value,
             "reason": decision.reason}
        )  # fmt: skip
        history.append(entry.model_dump(by_alias=True, exclude_none=True))
    limited = bool(decision.limited)
    states = {ABLE_TO_SCALE: write.ok, SCALING_ACTIVE: decision.active, SCALING_LIMITED: limited}
    reasons = {
        ABLE_TO_SCALE: (write.reason, write.message),
        SCALING_ACTIVE: (
            decision.active_reason,
            f"the replicas follow {metric}" if decision.active else decision.reason,
        ),
        SCALING_LIMITED: (
            (decision.limited or "", decision.reason) if limited else ("DesiredWithinRange", "within range")
        ),
    }
    status = AutoscalingStatus(
        desired_replicas=decision.desired,
        current_replicas=current,
        metric=metric,
        current_value=None if decision.value is None else round(decision.value, 3),
        mode=decision.mode,
        last_scale_time=now if scaled else previous.get("lastScaleTime"),
        conditions=build_conditions(states, reasons, generation, previous, now),
        history=history[-HISTORY_LENGTH:],
    )
    return status.model_dump(by_alias=True, exclude_none=True)


def worth_writing(new: dict[str, Any], previous: dict[str, Any], value_is_due: bool) -> bool:
    """Anything but currentValue changed, or currentValue changed and its refresh is due."""
    if {k: v for k, v in new.items() if k != "currentValue"} != {
        k: v for k, v in previous.items() if k != "currentValue"
    }:
        return True
    return value_is_due and new.get("currentValue") != previous.get("currentValue")
