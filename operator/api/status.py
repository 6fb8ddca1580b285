"""The InferenceService's status, written by the operator (kstatus conditions, revisions and the
rollout's state)."""

from __future__ import annotations

from typing import Any, Literal

from kvpilot.operator.api.rollout import RevisionStatus, RolloutStatus
from kvpilot.operator.api.spec import _Model
from pydantic import Field


class Condition(_Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(
        description="Ready, Reconciling or Stalled (kstatus), ModelCached (with spec.model.cache)."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation this condition was computed for."
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
    fit: str | None = Field(
        default=None,
        description="GPU memory estimate: weights + KV cache against resources.gpu.memory (with "
        "spec.model.architecture).",
    )

    def to_body(self) -> dict[str, Any]:
        """The status as written to the API: camelCase, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True)
