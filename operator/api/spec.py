"""The parts of an InferenceService's spec: model, engine, resources, scheduling, autoscaling and
the core/v1 types it embeds (the rollout's are in rollout.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from kvpilot.operator.api.base import _Model
from kvpilot.operator.api.constants import (
    DEFAULT_GPU_RESOURCE,
    MODEL_URI_PATTERN,
    AutoscalingEngine,
    AutoscalingMetric,
)
from kvpilot.operator.api.model import ModelArchitecture, ModelCacheSpec
from kvpilot.operator.api.validation import (
    AUTOSCALING_RULES,
    MODEL_RULES,
    Duration,
    LabelValue,
    Quantity,
    at_least,
    cel_rules,
    check_model_uri,
    enforce,
)
from kvpilot.serving.contract import DTYPES, KV_CACHE_DTYPES, QUANTIZATION_MODES
from pydantic import AfterValidator, ConfigDict, Field, model_validator

MIN_KV_CACHE_MEMORY = "1Mi"  # a few blocks of any model: below it the server cannot start


class ModelSource(_Model):
    """Which model to serve and where its weights come from."""

    model_config = ConfigDict(json_schema_extra=cel_rules(MODEL_RULES))

    name: str = Field(
        description="Served model name: the `model` field clients send to the OpenAI-compatible API.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$",
        max_length=128,
    )
    uri: Annotated[str, AfterValidator(check_model_uri)] = Field(
        description="Where the weights are: pvc://CLAIM/path (mounted read-only), "
        "hf://org/repo[@revision], s3://bucket/path or gs://bucket/path (downloaded by an init "
        "container, or once into spec.model.cache), or oci://image:tag (an image volume, on by default "
        "since Kubernetes 1.35).",
        json_schema_extra={"pattern": MODEL_URI_PATTERN},
        max_length=1024,
    )
    revision: str | None = Field(
        default=None,
        description="Revision (branch, tag or commit) of an hf:// model; same as hf://org/repo@revision.",
        pattern=r"^[A-Za-z0-9._/-]+$",
        max_length=256,
    )

    size: Quantity | None = Field(
        default=None,
        description="Size of the model's files, e.g. 20Gi: the sizeLimit of the per-pod download "
        "volume and the pod's ephemeral-storage request (without spec.model.cache).",
    )
    cache: ModelCacheSpec | None = Field(
        default=None,
        description="Download an hf://, s3:// or gs:// model once into a PersistentVolumeClaim "
        "(a Job per model and revision) and mount it read-only in every replica.",
    )
    architecture: ModelArchitecture | None = Field(
        default=None,
        description="The model's shape, for the memory fit estimate on a GPU or CPU replica "
        "(status.fit, kvpilot render).",
    )

    @model_validator(mode="after")
    def _check_rules(self) -> ModelSource:
        return enforce(self, MODEL_RULES)


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
    dtype: Literal[DTYPES] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="Model dtype (`--dtype`); auto: the checkpoint's (bf16/fp16) on a GPU, float32 on "
        "CPU. Unset: auto on GPU replicas, the server's default otherwise.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of the GPU's memory the server may use; the KV cache gets what weights "
        "and activations leave (`--gpu-memory-utilization`, default 0.9 on GPU replicas).",
    )
    kv_cache_memory: Annotated[Quantity, at_least(MIN_KV_CACHE_MEMORY)] | None = Field(
        default=None,
        description=f"KV cache size, e.g. 20Gi, at least {MIN_KV_CACHE_MEMORY} (`--kv-cache-memory`); "
        "overrides the sizing by gpuMemoryUtilization.",
    )
    load_timeout: Duration = Field(
        default="30m",
        description="Longest time to load and warm up the model before the startup probe restarts "
        "the container, e.g. 30m or 1h.",
    )
    drain_timeout: Duration = Field(
        default="30s",
        description="Time in-flight requests get to finish on shutdown (`--shutdown-timeout`); the "
        "pod's terminationGracePeriodSeconds follows. Give long streams more, e.g. 10m.",
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
    memory: Quantity | None = Field(
        default=None,
        description="Memory of one GPU, e.g. 80Gi: with spec.model.architecture, the operator checks "
        "that weights and KV cache fit before any pod is scheduled.",
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
        default=None,
        description="Memory per replica (request and limit), e.g. 16Gi: with spec.model.architecture, a "
        "CPU replica's weights, KV cache and server are checked to fit before any pod is scheduled.",
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

    node_selector: dict[str, LabelValue] = Field(
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


class PrometheusSpec(_Model):
    """The Prometheus server a KEDA ScaledObject queries."""

    address: str = Field(
        description="Server address, e.g. http://prometheus.monitoring:9090.",
        pattern=r"^https?://[^\s]+$",
        max_length=1024,
    )
    query: str | None = Field(
        default=None,
        max_length=4096,
        description="PromQL whose value, divided by the replicas, is held at the target (default: the "
        "metric summed over this model's pods, see the README).",
    )


class AutoscalingSpec(_Model):
    """Replica bounds, the metric and the policy of the autoscaler (KPA-style: a stable and a panic
    window). With it, spec.replicas does not reach the Deployment: the autoscaler owns its replicas."""

    model_config = ConfigDict(json_schema_extra=cel_rules(AUTOSCALING_RULES))

    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Fewest replicas; 0: scale to zero when idle (needs the router).",
    )
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas.")
    metric: AutoscalingMetric = Field(
        default="kvCacheUsage",
        description="Per-replica metric held at the target: kvCacheUsage (vllm:kv_cache_usage_perc, 0-1), "
        "numRequestsWaiting, numRequestsRunning, or concurrency (running + waiting + queued at the router).",
    )
    target: float = Field(gt=0, le=10_000, description="Target value of the metric per replica.")
    engine: AutoscalingEngine = Field(
        default="kvpilot",
        description="Who scales: kvpilot (the operator's own autoscaler, from the pods' /metrics), hpa (an "
        "autoscaling/v2 HorizontalPodAutoscaler through a metrics adapter) or keda (a KEDA ScaledObject "
        "with a Prometheus trigger).",
    )
    scale_to_zero_after: Duration = Field(
        default="5m", description="Idle time (nothing running, waiting or queued) before 1 -> 0 replicas."
    )
    stable_window: Duration = Field(default="60s", description="Averaging window of the stable mode.")
    panic_window: Duration = Field(
        default="6s", description="Averaging window of the panic mode (at most stableWindow)."
    )
    panic_threshold: float = Field(
        default=2.0,
        gt=1,
        le=10,
        description="Panic when the panic window's demand reaches this multiple of the ready replicas' "
        "capacity; while panicking the autoscaler never scales down.",
    )
    max_scale_up_rate: float = Field(
        default=2.0,
        gt=1,
        le=1000,
        description="At most this factor more replicas per decision (always allowing one more).",
    )
    max_scale_down_rate: float = Field(
        default=2.0, gt=1, le=1000, description="At most this factor fewer replicas per decision."
    )
    scale_down_delay: Duration = Field(
        default="5m",
        description="Scale-down stabilization: the highest recommendation of this window wins.",
    )
    tolerance: float = Field(
        default=0.1, ge=0, lt=1, description="No change while the metric is within this fraction of target."
    )
    initial_delay: Duration = Field(
        default="0s",
        description="Ignore a pod's metrics until it has been Ready this long (model loads take minutes; "
        "a pod that is not Ready never counts).",
    )
    prometheus: PrometheusSpec | None = Field(
        default=None, description="The Prometheus server of engine keda (required there)."
    )

    @model_validator(mode="after")
    def _check_rules(self) -> AutoscalingSpec:
        return enforce(self, AUTOSCALING_RULES)


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
