"""What the server and the operator must agree on: ports, paths, flags and metric names.

The operator imports this module to build Deployments and read metrics; it must stay
free of heavy imports (no torch, no FastAPI) so the operator image stays small.
"""

DEFAULT_PORT = 8000
PORT_NAME = "http"

HEALTH_PATH = "/health"  # process is alive
READY_PATH = "/ready"  # model loaded, warm-up done, not draining
METRICS_PATH = "/metrics"
MODELS_PATH = "/v1/models"

ENV_PREFIX = "KVPILOT_"  # every `kvpilot serve --some-flag` is also KVPILOT_SOME_FLAG

# `kvpilot serve` flags the operator sets, keyed by the setting they carry.
SERVE_FLAGS = {
    "model": "--model",
    "served_model_name": "--served-model-name",
    "host": "--host",
    "port": "--port",
    "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "enable_prefix_caching": "--enable-prefix-caching",
    "disable_prefix_caching": "--no-enable-prefix-caching",
    "quantization": "--quantization",
    "kv_cache_dtype": "--kv-cache-dtype",
    "tensor_parallel_size": "--tensor-parallel-size",
    "max_queue_len": "--max-queue-len",
    "shutdown_timeout": "--shutdown-timeout",
    "api_key": "--api-key",
}

QUANTIZATION_MODES = ("none", "int8", "w8a8", "int4", "fp8")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")

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
METRIC_TIME_TO_FIRST_TOKEN = "vllm:time_to_first_token_seconds"
METRIC_INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"
METRIC_E2E_REQUEST_LATENCY = "vllm:e2e_request_latency_seconds"
METRIC_REQUEST_QUEUE_TIME = "vllm:request_queue_time_seconds"
METRIC_REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
METRIC_REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"
METRIC_MODEL_WEIGHT_BYTES = "kvpilot_model_weight_bytes"
