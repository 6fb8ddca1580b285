"""The InferenceService API (kvpilot.dev/v1alpha1), defined once.

The CRD schema in crds/ is generated from these models (see crd.py); the operator parses
every object it reconciles with them. Cross-field rules live twice on purpose: as CEL
`x-kubernetes-validations` (enforced by the API server at admission) and as pydantic
validators (enforced by the operator, which also sees objects stored before a rule existed).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from kvpilot.serving.contract import KV_CACHE_DTYPES, QUANTIZATION_MODES
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kvpilot.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ["isvc"]

DEFAULT_IMAGE = "ghcr.io/kvpilot/kvpilot:0.1.0"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

# Kubernetes' own quantity grammar (resource.Quantity), e.g. 16Gi, 500m, 2.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
MODEL_URI_PATTERN = (
    r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?"
    r"|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+(@[A-Za-z0-9._/-]+)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?"
    r"|gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[^\s]*)?"
    r"|oci://[a-z0-9][^\s]*)$"
)
DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
OPERATOR_LABEL_KEYS = tuple(f"app.kubernetes.io/{k}" for k in ("name", "instance", "component", "managed-by"))

AutoscalingMetric = Literal["kvCacheUsage", "numRequestsWaiting", "numRequestsRunning"]


def _quantity_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _check_quantity(value: str) -> str:
    if not re.match(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 16Gi, 500m, 2)")
    return value


def _check_model_uri(value: str) -> str:
    if not re.match(MODEL_URI_PATTERN, value):
        raise ValueError(
            f"{value!r} is not pvc://CLAIM/path, hf://org/repo[@revision], s3://bucket/path, "
            "gs://bucket/path or oci://image"
        )
    return value


# int-or-string in the schema (`cpu: 2` and `cpu: "500m"` are both valid), always a string here.
Quantity = Annotated[int | str, BeforeValidator(_quantity_to_str), AfterValidator(_check_quantity)]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelSource(_Model):
    """Which model to serve and where its weights come from."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.revision) || self.uri.startsWith('hf://')",
                    "message": "spec.model.revision applies to hf:// URIs only",
                    "fieldPath": ".revision",
                },
                {
                    "rule": "!has(self.revision) || !self.uri.contains('@')",
                    "message": "set the revision either in spec.model.uri (@revision) or in "
                    "spec.model.revision, not both",
                    "fieldPath": ".revision",
                },
            ]
        }
    )

    name: str = Field(
        description="Served model name: the `model` field clients send to the OpenAI-compatible API.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$",
        max_length=128,
    )
    uri: Annotated[str, AfterValidator(_check_model_uri)] = Field(
        description="Where the weights are: pvc://CLAIM/path (mounted read-only), "
        "hf://org/repo[@revision], s3://bucket/path or gs://bucket/path (downloaded by an init "
        "container), or oci://image:tag (an image volume, Kubernetes 1.33+).",
        json_schema_extra={"pattern": MODEL_URI_PATTERN},
        max_length=1024,
    )
    revision: str | None = Field(
        default=None,
        description="Revision (branch, tag or commit) of an hf:// model; same as hf://org/repo@revision.",
        pattern=r"^[A-Za-z0-9._/-]+$",
        max_length=256,
    )

    @model_validator(mode="after")
    def _check_revision(self) -> ModelSource:
        if self.revision is not None and not self.uri.startswith("hf://"):
            raise ValueError("spec.model.revision applies to hf:// URIs only")
        if self.revision is not None and "@" in self.uri:
            raise ValueError(
                "set the revision either in spec.model.uri (@revision) or in spec.model.revision, not both"
            )
        return self


class EngineSpec(_Model):
    """Settings of the `kvpilot serve` engine; each maps to one server flag."""

    quantization: Literal[QUANTIZATION_MODES] = Field(  # type: ignore[valid-type]
        default="none", description="Weight quantization (`--quantization`)."
    )
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = Field(  # type: ignore[valid-type]
        default="auto", description="KV cache element type (`--kv-cache-dtype`); auto follows the model."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=1_048_576,
        description="Longest sequence (prompt + output) in tokens (`--max-model-len`); "
        "unset: the model's own limit.",
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, le=4096, description="Most requests batched in one step (`--max-num-seqs`)."
    )
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=16,
        le=1_048_576,
        description="Token budget of one scheduler step (`--max-num-batched-tokens`).",
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse KV blocks of shared prompt prefixes (`--enable-prefix-caching`)."
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs one replica shards the model over (`--tensor-parallel-size`); only 1 until "
        "the bundled server supports tensor parallelism.",
    )
    extra_args: list[Annotated[str, Field(max_length=1024, description="One argument.")]] = Field(
        default_factory=list,
        max_length=64,
        description="Extra `kvpilot serve` arguments, appended after the ones the operator sets.",
    )


class GPUResources(_Model):
    """GPUs per replica."""

    count: int = Field(default=0, ge=0, le=64, description="GPUs per replica (0: CPU only).")
    resource_name: str = Field(
        default=DEFAULT_GPU_RESOURCE,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9._]*[a-z0-9])?$",
        max_length=253,
        description="Extended resource that schedules the GPUs, e.g. nvidia.com/gpu or amd.com/gpu.",
    )


class ResourcesSpec(_Model):
    """Compute resources of one replica."""

    gpu: GPUResources = Field(
        default_factory=GPUResources,
        json_schema_extra={"default": {}},
        description="GPUs per replica.",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request per replica, e.g. 4 or 500m.")
    memory: Quantity | None = Field(
        default=None, description="Memory per replica (request and limit), e.g. 16Gi."
    )
    shared_memory: Quantity = Field(
        default="2Gi", description="Size of the in-memory /dev/shm volume (used by tensor parallelism)."
    )


class Toleration(_Model):
    """A core/v1 Toleration."""

    key: str | None = Field(default=None, max_length=316, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (default Equal)."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value to match.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated before eviction."
    )


class SchedulingSpec(_Model):
    """Where replicas may run."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a replica's node must carry."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints replicas tolerate."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="A core/v1 Affinity, copied to the pods as is.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the pods."
    )
    runtime_class_name: str | None = Field(
        default=None, max_length=253, description="RuntimeClass of the pods (e.g. nvidia)."
    )


class AutoscalingSpec(_Model):
    """Replica bounds and the metric the autoscaler follows (mutually exclusive with spec.replicas)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas",
                    "fieldPath": ".minReplicas",
                }
            ]
        }
    )

    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas.")
    metric: AutoscalingMetric = Field(
        default="kvCacheUsage",
        description="Per-replica server metric to hold at the target: kvCacheUsage "
        "(vllm:kv_cache_usage_perc, 0-1), numRequestsWaiting or numRequestsRunning.",
    )
    target: float = Field(gt=0, le=10_000, description="Target value of the metric, averaged over replicas.")

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas")
        return self


class RolloutSpec(_Model):
    """How a spec change reaches the pods."""

    strategy: Literal["Rolling"] = Field(
        default="Rolling",
        description="Rolling: replace replicas one at a time, never below the desired count.",
    )


class LocalObjectReference(_Model):
    """A reference to an object in the same namespace."""

    name: str = Field(max_length=253, description="Name of the referenced object.")


class EnvVar(_Model):
    """A core/v1 EnvVar."""

    name: str = Field(max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name.")
    value: str | None = Field(default=None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="A core/v1 EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, ...).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


TENSOR_PARALLEL_UNSUPPORTED = (
    "spec.engine.tensorParallelSize: tensor parallelism is not supported yet (the bundled kvpilot server "
    "runs one device per replica); use 1 and scale out with replicas"
)

SPEC_RULES = [
    {
        "rule": "!(has(self.replicas) && has(self.autoscaling))",
        "message": "spec.replicas and spec.autoscaling are mutually exclusive",
        "fieldPath": ".replicas",
    },
    {
        "rule": "!has(self.engine) || !has(self.engine.tensorParallelSize) || "
        "self.engine.tensorParallelSize == 1",
        "message": TENSOR_PARALLEL_UNSUPPORTED,
        "fieldPath": ".engine.tensorParallelSize",
    },
    {
        # Constant-cost `in` checks: a loop over the map's keys could exceed the CEL cost budget.
        "rule": "!has(self.podLabels) || "
        + " && ".join(f"!('{key}' in self.podLabels)" for key in OPERATOR_LABEL_KEYS),
        "message": "spec.podLabels must not set the operator's app.kubernetes.io/ labels",
        "fieldPath": ".podLabels",
    },
]


class InferenceServiceSpec(_Model):
    """Desired state of an InferenceService: one model served by N `kvpilot serve` replicas."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": SPEC_RULES})

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
    replicas: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Fixed replica count (the scale subresource); 1 when neither this nor "
        "autoscaling is set. Mutually exclusive with autoscaling.",
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None,
        description="Autoscaling bounds and metric; until the autoscaler ships, runs minReplicas.",
    )
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec, json_schema_extra={"default": {}}, description="Rollout strategy."
    )
    image: str = Field(
        default=DEFAULT_IMAGE, min_length=1, max_length=1024, description="kvpilot server image."
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
    pod_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra pod labels (not the operator's app.kubernetes.io/ name, instance, component, "
        "managed-by).",
    )

    @model_validator(mode="after")
    def _check_cross_field(self) -> InferenceServiceSpec:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("spec.replicas and spec.autoscaling are mutually exclusive")
        if self.engine.tensor_parallel_size != 1:
            raise ValueError(TENSOR_PARALLEL_UNSUPPORTED)
        reserved = sorted(k for k in self.pod_labels if k in OPERATOR_LABEL_KEYS)
        if reserved:
            raise ValueError(f"spec.podLabels must not set the operator's labels: {reserved}")
        return self

    @property
    def effective_replicas(self) -> int:
        if self.autoscaling is not None:
            return self.autoscaling.min_replicas
        return 1 if self.replicas is None else self.replicas


class Condition(_Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(description="Ready, Reconciling or Stalled (kstatus).")
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


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True, alias_generator=to_camel)

    name: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
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
