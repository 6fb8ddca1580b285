"""The rollout API: `spec.rollout` (strategy, canary steps, analysis, capacity, manual control)
and what the operator reports about it (`status.revisions`, `status.rollout`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from kvpilot.operator.api.base import _Model
from kvpilot.operator.api.validation import ROLLOUT_RULES, Duration, cel_rules, enforce
from pydantic import ConfigDict, Field, model_validator

Strategy = Literal["Rolling", "Canary", "BlueGreen"]
CapacityPolicy = Literal["Surge", "InPlace", "Auto"]
CapacityMode = Literal["Surge", "InPlace"]
RolloutPhase = Literal["Progressing", "Paused", "Promoted", "RolledBack", "Failed"]
RevisionPhase = Literal["Active", "Canary", "Retired", "Failed"]
MANUAL_PAUSE = "manual"
REVISION_PATTERN = r"^[a-z0-9]{1,16}$"


class RolloutStep(_Model):
    """One canary step: send `weight` percent of new requests to the new revision, then pause."""

    weight: int = Field(ge=0, le=100, description="Percent of new requests for the new revision.")
    pause: Annotated[str, Field(pattern=rf"^({MANUAL_PAUSE}|([0-9]+(s|m|h))+)$", max_length=32)] | None = (
        Field(
            default=None,
            description="How long to hold this weight once the new revision's replicas are ready "
            "(e.g. 30s, 5m, 1h), or `manual` to wait for `kvpilot rollout promote`; unset: go on.",
        )
    )


class TTFTThresholds(_Model):
    """Time-to-first-token limits, in seconds."""

    p95: float | None = Field(default=None, gt=0, le=3600, description="95th percentile limit.")


class AnalysisSpec(_Model):
    """Checks of the new revision's traffic, from the router's per-revision metrics, or from the new
    revision's engine pods without the router and during a BlueGreen preview."""

    interval: Duration = Field(default="1m", description="Time between two checks (e.g. 30s, 1m).")
    max_error_rate: float | None = Field(
        default=None, ge=0, le=1, description="Largest share of 5xx answers (0-1) a check passes with."
    )
    max_ttft_seconds: TTFTThresholds | None = Field(
        default=None, alias="maxTTFTSeconds", description="Time-to-first-token limits a check passes with."
    )
    min_requests: int = Field(
        default=50,
        ge=0,
        le=1_000_000,
        description="Requests a check needs to judge; fewer make the check inconclusive (not failed).",
    )
    failure_limit: int = Field(
        default=2, ge=1, le=100, description="Consecutive failed checks that fail the rollout."
    )


class RolloutSpec(_Model):
    """How a change of the pods (a new revision) reaches the traffic."""

    model_config = ConfigDict(json_schema_extra=cel_rules(ROLLOUT_RULES))

    strategy: Strategy = Field(
        default="Rolling",
        description="Rolling: the new revision scales up pod by pod while the old one scales down, "
        "weights follow ready pods. Canary: `steps` of weights and pauses, checked by `analysis`. "
        "BlueGreen: the new revision scales fully at weight 0 (Service <name>-preview), then a "
        "promote moves all traffic at once.",
    )
    steps: list[RolloutStep] = Field(
        default_factory=list,
        max_length=20,
        description="Canary steps; after the last one the new revision gets 100% and becomes stable.",
    )
    analysis: AnalysisSpec | None = Field(
        default=None, description="Metric checks of the new revision (Canary and BlueGreen)."
    )
    auto_rollback: bool = Field(
        default=True,
        description="On a failed analysis or a new revision not Ready within progressDeadline: all "
        "traffic back to the stable revision, the new one scaled to 0.",
    )
    capacity: CapacityPolicy = Field(
        default="Auto",
        description="Surge: extra pods for the new revision. InPlace: take one pod from the old "
        "revision for each new one. Auto: surge, and switch to in-place when a new pod stays "
        "Unschedulable for capacityTimeout.",
    )
    capacity_timeout: Duration = Field(
        default="2m", description="How long a new pod may stay Unschedulable before Auto goes in-place."
    )
    progress_deadline: Duration = Field(
        default="15m",
        description="How long the new revision may go without a replica becoming Ready before the "
        "rollout fails (a model that does not load, a crash loop).",
    )
    paused: bool = Field(default=False, description="Hold the rollout where it is.")
    rollback_to: str | None = Field(
        default=None,
        pattern=REVISION_PATTERN,
        description="Serve this remembered revision (status.revisions[].hash) instead of the spec's.",
    )

    @model_validator(mode="after")
    def _check_rules(self) -> RolloutSpec:
        return enforce(self, ROLLOUT_RULES)


class AnalysisResult(_Model):
    """One check of the new revision's traffic since the previous check."""

    time: str = Field(description="When the check ran (RFC 3339).")
    requests: int = Field(description="Requests answered by the new revision in the interval.")
    error_rate: float | None = Field(default=None, description="Share of 5xx answers.")
    ttft_p95: float | None = Field(default=None, description="95th percentile time to first token (s).")
    passed: bool | None = Field(
        default=None, description="True passed, False failed, unset: too few requests."
    )
    message: str = Field(default="", description="What was measured against which limit.")
    counters: dict[str, float] = Field(
        default_factory=dict,
        description="The cumulative counters read at this check (the router's, or the engine pods'): "
        "the next check's baseline.",
    )


class HistoryEntry(_Model):
    """One transition of the rollout."""

    time: str = Field(description="When (RFC 3339).")
    phase: RolloutPhase = Field(description="The phase entered.")
    revision: str = Field(description="The revision being rolled out.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field(default="", description="Details, with the numbers that decided.")


class RolloutStatus(_Model):
    """Where the rollout is: the operator carries on from here after a restart."""

    phase: RolloutPhase = Field(description="Progressing, Paused, Promoted, RolledBack or Failed.")
    revision: str = Field(description="The revision being (or last) rolled out.")
    stable_revision: str = Field(description="The revision serving when the rollout began.")
    strategy: Strategy = Field(default="Rolling", description="Strategy of this rollout.")
    reason: str = Field(default="", description="CamelCase reason of the phase.")
    message: str = Field(default="", description="Details of the phase.")
    step: int | None = Field(default=None, description="Index of the current canary step.")
    step_reached_at: str | None = Field(
        default=None, description="When the current step's weight was reached (its pause runs from here)."
    )
    canary_weight: int = Field(default=0, description="Percent of new requests the new revision gets.")
    capacity_mode: CapacityMode = Field(default="Surge", description="Surge or InPlace.")
    capacity_reason: str = Field(default="", description="Why this capacity mode.")
    started_at: str | None = Field(default=None, description="When this rollout began.")
    progress_at: str | None = Field(
        default=None, description="When the new revision last gained a Ready replica or a step."
    )
    ready_replicas: int = Field(default=0, description="Ready replicas of the new revision, last seen.")
    replicas: int | None = Field(
        default=None, description="The total replicas the revisions share (spec or autoscaler)."
    )
    failed_checks: int = Field(default=0, description="Consecutive failed analysis checks.")
    last_analysis: AnalysisResult | None = Field(default=None, description="The latest analysis check.")
    history: list[HistoryEntry] = Field(
        default_factory=list, max_length=10, description="The last 10 transitions, oldest first."
    )


class RevisionStatus(_Model):
    """One revision: a hash of everything that shapes the pods, with its own Deployment."""

    name: str = Field(description="Its Deployment: <name>-<hash>.")
    hash: str = Field(description="Hash of the pod-shaping spec (label kvpilot.dev/revision).")
    model: str = Field(description="Served model name.")
    quantization: str = Field(description="Weight quantization.")
    image: str = Field(description="Server image.")
    replicas: int = Field(default=0, description="Replicas it has.")
    ready_replicas: int = Field(default=0, description="Replicas passing their readiness probe.")
    weight: int = Field(default=0, description="Percent of new requests it gets.")
    created_at: str = Field(description="When the operator first created it (RFC 3339).")
    phase: RevisionPhase = Field(description="Active, Canary, Retired or Failed.")
    spec: dict[str, Any] = Field(
        default_factory=dict,
        description="The pod-shaping parts of the spec it was built from (for rollbackTo).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
