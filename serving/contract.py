"""What the server and the operator must agree on: ports, paths, flags and metric names.

The operator imports this module to build Deployments and read metrics; it must stay
free of heavy imports (no torch, no FastAPI) so the operator image stays small.
"""

from dataclasses import dataclass
from typing import Any

DEFAULT_PORT = 8000
PORT_NAME = "http"

HEALTH_PATH = "/health"  # process is alive
READY_PATH = "/ready"  # model loaded, warm-up done, not draining
METRICS_PATH = "/metrics"
MODELS_PATH = "/v1/models"

ENV_PREFIX = "KVPILOT_"  # every `kvpilot serve --some-flag` is also KVPILOT_SOME_FLAG

QUANTIZATION_MODES = ("none", "int8", "w8a8", "int4", "fp8")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: the checkpoint's on CUDA, float32 on CPU
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes' terminationMessagePath default

# A CPU server's KV cache unless --kv-cache-memory says otherwise, capped in a container with a
# memory limit by CPU_MEMORY_UTILIZATION of the limit minus what the loaded server holds (the rest
# is the activations' headroom). The operator's fit estimate plans with the same figures.
CPU_KV_CACHE_BYTES = 1 << 30
CPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class ServeSetting:
    """One `kvpilot serve` setting, declared once: the flag (`--max-num-seqs`), the environment
    variable (`KVPILOT_MAX_NUM_SEQS`), the `ServeSettings` field and the operator's rendering all
    derive from it."""

    name: str
    type: type  # int, float, str or bool (a bool is --flag / --no-flag)
    default: Any
    help: str
    minimum: float | None = None  # inclusive
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    engine_field: str | None = None  # the EngineConfig field it sets, if any
    crd_field: str | None = None  # the InferenceService `spec.engine` field that sets it, if any

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def negative_flag(self) -> str:
        return "--no-" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SERVE_SETTINGS = (
    ServeSetting("model", str, None, "checkpoint directory or .gguf file (default: SmolLM2-135M)"),
    ServeSetting("served_model_name", str, None, "the model name clients send (default: --model)"),
    ServeSetting("host", str, "127.0.0.1", "bind address"),
    ServeSetting("port", int, DEFAULT_PORT, "bind port", minimum=0),
    ServeSetting(
        "max_num_seqs", int, 64, "sequences in one batch", 1, metavar="N", engine_field="max_num_seqs",
        crd_field="max_num_seqs",
    ),
    ServeSetting(
        "max_num_batched_tokens", int, 512, "token budget of one engine step", 1, metavar="N",
        engine_field="max_num_batched_tokens", crd_field="max_num_batched_tokens",
    ),
    ServeSetting(
        "max_model_len", int, None, "context length (default: the model's)", 1, metavar="N",
        engine_field="max_model_len", crd_field="max_model_len",
    ),
    ServeSetting("block_size", int, 16, "tokens per KV block", 1, metavar="N", engine_field="block_size"),
    ServeSetting(
        "num_kv_blocks", int, None, "KV blocks (default: sized from the KV cache memory)", 1, metavar="N",
        engine_field="num_kv_blocks",
    ),
    ServeSetting(
        "kv_cache_memory", int, None,
        "KV cache budget, e.g. 2GiB or a number of bytes (default: on CUDA what --gpu-memory-utilization "
        "leaves, on CPU 1GiB or less if the container's memory limit leaves less)", 1, metavar="SIZE",
        engine_field="kv_cache_memory_bytes", crd_field="kv_cache_memory",
    ),
    ServeSetting(
        "gpu_memory_utilization", float, 0.9,
        "share of the GPU's memory for weights, activations and the KV cache (0 < x <= 1; CUDA only)",
        metavar="FRACTION", engine_field="gpu_memory_utilization", crd_field="gpu_memory_utilization",
    ),
    ServeSetting(
        "enable_prefix_caching", bool, True, "automatic prefix caching", engine_field="enable_prefix_caching",
        crd_field="enable_prefix_caching",
    ),
    ServeSetting(
        "dtype", str, "auto", "model dtype (auto: the checkpoint's bfloat16/float16 on CUDA, float32 on CPU)",
        choices=DTYPES, engine_field="dtype", crd_field="dtype",
    ),
    ServeSetting(
        "quantization", str, "none", "weight format", choices=QUANTIZATION_MODES, engine_field="quantization",
        crd_field="quantization",
    ),
    ServeSetting(
        "kv_cache_dtype", str, "auto", "KV cache format", choices=KV_CACHE_DTYPES,
        engine_field="kv_cache_dtype", crd_field="kv_cache_dtype",
    ),
    ServeSetting(
        "tensor_parallel_size", int, 1, "devices per replica (only 1 is supported)", 1, metavar="N",
        crd_field="tensor_parallel_size",
    ),
    ServeSetting("seed", int, 0, "engine seed for unseeded sampling", metavar="N", engine_field="seed"),
    ServeSetting(
        "speculative_ngram", int, None, "speculative decoding by prompt lookup: match the last N tokens",
        1, metavar="N", engine_field="speculative_ngram",
    ),
    ServeSetting(
        "num_speculative_tokens", int, None, "draft tokens per step (with --speculative-ngram)", 1,
        metavar="K", engine_field="num_speculative_tokens",
    ),
    ServeSetting(
        "max_queue_len", int, 256,
        "waiting sequences (prompts x n) before 429; a request with more alone gets 400", 0, metavar="N",
    ),
    ServeSetting(
        "shutdown_timeout", float, 30.0, "drain time on SIGTERM", 0, metavar="SECONDS",
        crd_field="drain_timeout",
    ),
    ServeSetting("api_key", str, None, "require `Authorization: Bearer KEY` on /v1/*"),
    ServeSetting("access_log", bool, True, "log every HTTP request"),
    ServeSetting(
        "max_request_bytes", int, 4 << 20, "largest request body, e.g. 4MiB; larger ones get 413", 1,
        metavar="SIZE",
    ),
    ServeSetting(
        "inject_error_rate", float, 0.0,
        "TEST AID, never for production: answer this share (0..1) of /v1/completions and "
        "/v1/chat/completions requests with HTTP 500 before any token (spread evenly: 0.25 fails "
        "every fourth)", 0, metavar="FRACTION",
    ),
    ServeSetting(
        "termination_log", str, None,
        f"file for a one-line reason of a fatal start-up error (default {TERMINATION_LOG} when it exists "
        "and is writable; '' for none)", metavar="PATH",
    ),
)  # fmt: skip
SERVE_SETTING = {setting.name: setting for setting in SERVE_SETTINGS}

# Settings an InferenceService does not expose as a field, and why (anything else reaches the
# server through `spec.engine.extraArgs`). A test fails when an engine setting is in neither.
NOT_IN_CRD = {
    "model": "the operator passes the mounted model's path (spec.model.uri)",
    "served_model_name": "spec.model.name",
    "host": "the operator binds 0.0.0.0",
    "port": "the operator uses DEFAULT_PORT, the Service's target port",
    "block_size": "an engine tuning knob; spec.engine.extraArgs",
    "num_kv_blocks": "sized from the KV cache memory; spec.engine.extraArgs",
    "max_request_bytes": "spec.engine.extraArgs",
    "termination_log": "Kubernetes' default terminationMessagePath, /dev/termination-log",
    "seed": "spec.engine.extraArgs",
    "speculative_ngram": "spec.engine.extraArgs (speculative decoding is a per-workload tuning knob)",
    "num_speculative_tokens": "spec.engine.extraArgs, with --speculative-ngram",
    "max_queue_len": "spec.engine.extraArgs",
    "api_key": "tenants' keys belong to the router; a server key would sit in the pod spec",
    "access_log": "spec.engine.extraArgs",
    "inject_error_rate": "a test aid (a canary that fails, for rollout analysis); spec.engine.extraArgs",
}


# Metric names follow vLLM's so dashboards, KEDA triggers and the Gateway API
# Inference Extension's endpoint picker work unchanged. Every metric has label `model_name`.
MODEL_NAME_LABEL = "model_name"
METRIC_NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
METRIC_NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
METRIC_KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
METRIC_CACHE_CONFIG_INFO = "vllm:cache_config_info"
METRIC_PROMPT_TOKENS = "vllm:prompt_tokens"  # counter; exposed with the _total suffix
METRIC_GENERATION_TOKENS = "vllm:generation_tokens"
METRIC_REQUEST_SUCCESS = "vllm:request_success"
METRIC_NUM_PREEMPTIONS = "vllm:num_preemptions"
METRIC_PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"
METRIC_PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"
METRIC_SPEC_DECODE_NUM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
METRIC_SPEC_DECODE_NUM_ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"
METRIC_TIME_TO_FIRST_TOKEN = "vllm:time_to_first_token_seconds"
METRIC_INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"
METRIC_E2E_REQUEST_LATENCY = "vllm:e2e_request_latency_seconds"
METRIC_REQUEST_QUEUE_TIME = "vllm:request_queue_time_seconds"
METRIC_REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
METRIC_REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"
METRIC_MODEL_WEIGHT_BYTES = "kvpilot_model_weight_bytes"
# The router's gauge of requests it holds for a model (no ready engine, or all engines busy); the
# operator's autoscaler reads it to scale from zero. Label: `model`.
METRIC_ROUTER_QUEUED_REQUESTS = "kvpilot_router_queued_requests"
ROUTER_MODEL_LABEL = "model"
