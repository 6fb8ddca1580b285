"""The InferenceService object: its spec (one model served by N `kvpilot serve` replicas) and
the metadata the operator reads."""

from __future__ import annotations

from typing import Any

from kvpilot.operator.api.constants import (
    DEFAULT_CUDA_IMAGE,
    DEFAULT_IMAGE,
    DNS_LABEL_PATTERN,
    NAME_MAX_LENGTH,
)
from kvpilot.operator.api.rollout import RolloutSpec
from kvpilot.operator.api.router import RouterSpec, TenantSpec
from kvpilot.operator.api.spec import (
    AutoscalingSpec,
    EngineSpec,
    EnvVar,
    LocalObjectReference,
    ModelSource,
    ResourcesSpec,
    SchedulingSpec,
    _Model,
)
from kvpilot.operator.api.validation import SPEC_RULES, LabelValue, cel_rules, enforce
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel


class InferenceServiceSpec(_Model):
    """Desired state of an InferenceService: one model served by N `kvpilot serve` replicas."""

    model_config = ConfigDict(json_schema_extra=cel_rules(SPEC_RULES))

    model: ModelSource = Field(description="The model to serve.")
    engine: EngineSpec = Field(
        default_factory=EngineSpec, json_schema_extra={"default": {}}, description="Engine settings."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        json_schema_extra={"default": {}},
        description="Compute resources of one replica.",
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec,
        json_schema_extra={"default": {}},
        description="Node selection and placement.",
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Replica count, also through the scale subresource (`kubectl scale isvc`). With "
        "autoscaling set it does not reach the Deployment: the autoscaler owns the replicas there.",
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None,
        description="Autoscaling bounds, metric and policy. The operator then leaves the Deployment's "
        "replicas to the autoscaler (its own, an HPA or KEDA: spec.autoscaling.engine).",
    )
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec,
        json_schema_extra={"default": {}},
        description="How a change of the pods reaches the traffic: strategy, steps, analysis, capacity.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description=f"kvpilot image (default: {DEFAULT_IMAGE}, and {DEFAULT_CUDA_IMAGE} for the "
        "server of GPU replicas).",
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the image."
    )
    service_account_name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="ServiceAccount the pods run as (default: the namespace's default, or the one "
        "created when createServiceAccount is true).",
    )
    create_service_account: bool = Field(
        default=False,
        description="Create a ServiceAccount named serviceAccountName (default: this object's name).",
    )
    service_account_annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations of the created ServiceAccount (e.g. cloud workload identity).",
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=128, description="Extra environment variables of the server."
    )
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")
    pod_labels: dict[str, LabelValue] = Field(
        default_factory=dict,
        description="Extra pod labels (not the operator's app.kubernetes.io/ name, instance, component, "
        "managed-by).",
    )
    router: RouterSpec = Field(
        default_factory=RouterSpec,
        json_schema_extra={"default": {}},
        description="The router in front of the engine pods (on by default).",
    )
    tenants: list[TenantSpec] = Field(
        default_factory=list,
        max_length=64,
        description="Tenants the router admits, each with its own API key and quotas (none: no auth).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    @model_validator(mode="after")
    def _check_rules(self) -> InferenceServiceSpec:
        return enforce(self, SPEC_RULES)

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, tenants: list[TenantSpec]) -> list[TenantSpec]:
        # The API server enforces it too: tenants is a list map keyed by name.
        names = [tenant.name for tenant in tenants]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"tenant names must be unique: {', '.join(repeated)} repeated")
        return tenants

    @property
    def managed_replicas(self) -> int | None:
        """The Deployment's replicas as the operator sets them; None when an autoscaler owns them."""
        return None if self.autoscaling is not None else self.replicas

    @property
    def uses_own_autoscaler(self) -> bool:
        """kvpilot's autoscaler (operator/autoscaler/) scales this InferenceService."""
        return self.autoscaling is not None and self.autoscaling.engine == "kvpilot"

    @property
    def most_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.replicas


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, alias_generator=to_camel)

    name: str = Field(max_length=NAME_MAX_LENGTH, pattern=DNS_LABEL_PATTERN)
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None


class InferenceService(BaseModel):
    """A whole InferenceService object as the operator sees it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    metadata: ObjectMeta
    spec: InferenceServiceSpec

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> InferenceService:
        return cls.model_validate({"metadata": body.get("metadata", {}), "spec": body.get("spec", {})})
