"""The InferenceService's status, written by the operator (kstatus conditions, revisions and the
rollout's state)."""

from __future__ import annotations

from typing import Any, Literal

from kvpilot.operator.api.base import _Model
from kvpilot.operator.api.rollout import RevisionStatus, RolloutStatus
from pydantic import Field


class Condition(_Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(
        description="Ready, Reconciling or Stalled (kstatus); ModelCached (with spec.model.cache); "
        "AbleToScale, ScalingActive or ScalingLimited (with spec.autoscaling)."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation this condition was computed for."
    )


class ScalingDecision(_Model):
    """One decision of the autoscaler that changed the desired replicas."""

    time: str = Field(description="When it was decided (RFC 3339).")
    from_replicas: int = Field(alias="from", description="Replicas before.")
    to: int = Field(description="Replicas after.")
    mode: Literal["stable", "panic"] = Field(description="stable or panic.")
    value: float | None = Field(default=None, description="The metric per replica it decided on.")
    reason: str = Field(description="Why, with the inputs.")


class AutoscalingStatus(_Model):
    """What kvpilot's autoscaler (engine kvpilot) last observed and decided."""

    desired_replicas: int = Field(description="Replicas the autoscaler wants.")
    current_replicas: int = Field(description="Replicas of the engine Deployment when it decided.")
    metric: str = Field(description="The metric it follows (spec.autoscaling.metric).")
    current_value: float | None = Field(
        default=None, description="The metric per ready replica, averaged over the stable window."
    )
    mode: Literal["stable", "panic"] = Field(description="stable or panic (a burst: never scales down).")
    last_scale_time: str | None = Field(default=None, description="When it last changed the replicas.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="AbleToScale, ScalingActive (False while metrics are missing) and ScalingLimited "
        "(clamped by min/max replicas or the scale rates).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    history: list[ScalingDecision] = Field(
        default_factory=list, max_length=10, description="The last 10 decisions that changed the replicas."
    )


class InferenceServiceStatus(_Model):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(
        default=None, description="metadata.generation the operator last reconciled."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Reconciling and Stalled conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    url: str | None = Field(default=None, description="In-cluster URL of the OpenAI-compatible API.")
    replicas: int | None = Field(default=None, description="Replicas that exist (scale subresource).")
    ready_replicas: int | None = Field(default=None, description="Replicas passing their readiness probe.")
    selector: str | None = Field(default=None, description="Label selector of the pods (scale subresource).")
    revisions: list[RevisionStatus] | None = Field(
        default=None,
        description="The serving revisions, then the last retired or failed ones (newest first).",
    )
    rollout: RolloutStatus | None = Field(default=None, description="The latest rollout.")
    desired_replicas: int | None = Field(
        default=None, description="Replicas wanted: spec.replicas, or the autoscaler's count."
    )
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="The autoscaler's state and its last decisions (engine kvpilot)."
    )
    fit: str | None = Field(
        default=None,
        description="GPU memory estimate: weights + KV cache against resources.gpu.memory (with "
        "spec.model.architecture).",
    )

    def to_body(self) -> dict[str, Any]:
        """The status as written to the API: camelCase, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True)
