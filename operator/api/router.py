"""The router in front of the engine (`spec.router`) and the tenants it admits (`spec.tenants`)."""

from __future__ import annotations

from typing import Annotated, Literal

from kvpilot.operator.api.base import _Model
from kvpilot.operator.api.constants import DNS_LABEL_PATTERN
from kvpilot.operator.api.validation import ACTIVATION_RULES, Duration, Quantity, cel_rules, enforce
from kvpilot.serving.router.config import BALANCING_POLICIES, DEFAULT_ACTIVATION_TIMEOUT, DEFAULT_MAX_QUEUED
from pydantic import ConfigDict, Field, model_validator


class RouterResources(_Model):
    """Compute resources of one router replica."""

    cpu: Quantity | None = Field(default="250m", description="CPU request per router replica.")
    memory: Quantity | None = Field(
        default="512Mi", description="Memory per router replica (request and limit)."
    )


class SecretKeyReference(_Model):
    """A key of a Secret in the InferenceService's namespace."""

    name: str = Field(
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of the Secret.",
    )
    key: str = Field(
        max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the Secret that holds the API key."
    )


class ActivationSpec(_Model):
    """Scale from zero: how the router holds requests while the model has no ready engine pod."""

    model_config = ConfigDict(json_schema_extra=cel_rules(ACTIVATION_RULES))

    timeout: Duration = Field(
        default=f"{DEFAULT_ACTIVATION_TIMEOUT:g}s",
        description="How long a request waits for a ready engine pod before it gets 503 (at least 1s; "
        "e.g. 300s, 5m).",
    )
    max_queued: int = Field(
        default=DEFAULT_MAX_QUEUED,
        ge=1,
        le=1_000_000,
        description="Most requests one router replica holds at once; one more gets 429 with Retry-After.",
    )

    @model_validator(mode="after")
    def _check_rules(self) -> ActivationSpec:
        return enforce(self, ACTIVATION_RULES)


class RouterSpec(_Model):
    """`kvpilot router`: the OpenAI-aware front door (tenant keys and quotas, prefix-aware balancing,
    requests held while the engine scales from zero). The `<name>` Service points at it."""

    enabled: bool = Field(
        default=True,
        description="Run the router. false: the `<name>` Service selects the engine pods directly "
        "(no tenants, no prefix affinity, no scale from zero).",
    )
    replicas: int = Field(default=2, ge=1, le=100, description="Router replicas.")
    resources: RouterResources = Field(
        default_factory=RouterResources,
        json_schema_extra={"default": {}},
        description="Compute resources of one router replica.",
    )
    balancing: Literal[BALANCING_POLICIES] = Field(  # type: ignore[valid-type]
        default="prefix",
        description="How the router spreads requests over engine pods: prefix (consistent hashing of "
        "the prompt's leading text with bounded loads, for prefix-cache hits), least-request or random.",
    )
    upstream_api_key_secret_ref: SecretKeyReference | None = Field(
        default=None,
        description="A Secret key the engine pods require on /v1/* (KVPILOT_API_KEY) and the router "
        "sends them, so that nobody in the cluster reaches the engine around the router's tenants "
        "through `<name>-engine`. Unset: the engine pods take requests without a key.",
    )
    activation: ActivationSpec = Field(
        default_factory=ActivationSpec,
        json_schema_extra={"default": {}},
        description="Scale from zero: requests wait at the router while no engine pod is ready.",
    )
    inference_pool: bool = Field(
        default=False,
        description="Also render a Gateway API Inference Extension InferencePool selecting the engine "
        "pods, when the cluster has the inference.networking.k8s.io CRD (ignored otherwise).",
    )


class TenantSpec(_Model):
    """A tenant: its API key (from a Secret the router mounts; the operator never reads it) and quotas."""

    name: str = Field(
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="Tenant name, as in the router's metrics and logs.",
    )
    api_key_secret_ref: SecretKeyReference = Field(
        description="The Secret key holding this tenant's API key (`Authorization: Bearer KEY`)."
    )
    models: list[Annotated[str, Field(max_length=128, description="A served model name.")]] | None = Field(
        default=None,
        max_length=64,
        description="Models this tenant may use (unset: all); others answer 404.",
    )
    requests_per_minute: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Most requests per minute (unset: no limit)."
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000_000,
        description="Most prompt + completion tokens per minute (unset: no limit).",
    )
