"""Names and formats of the InferenceService API (kvpilot.dev/v1alpha1)."""

from typing import Literal

GROUP = "kvpilot.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ["isvc"]

# The tags `make image` and `make image-cuda` build (Dockerfile targets cpu and cuda).
DEFAULT_IMAGE = "ghcr.io/kvpilot/kvpilot:0.1.0"
DEFAULT_CUDA_IMAGE = f"{DEFAULT_IMAGE}-cuda"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

# Kubernetes' own quantity grammar (resource.Quantity), e.g. 16Gi, 500m, 2, without a sign or zero:
# every quantity of the spec is a size or a CPU share.
QUANTITY_PATTERN = (
    r"^\+?(([0-9]*[1-9][0-9]*(\.[0-9]*)?)|([0-9]*\.[0-9]*[1-9][0-9]*))"
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
# A label value (metadata.labels, nodeSelector): at most 63 characters, alphanumeric at both ends.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# A Service name is a DNS label (63 characters); the engine's is `<name>-engine`.
NAME_MAX_LENGTH = 63 - len("-engine")
OPERATOR_LABEL_KEYS = tuple(f"app.kubernetes.io/{k}" for k in ("name", "instance", "component", "managed-by"))

AutoscalingMetric = Literal["kvCacheUsage", "numRequestsWaiting", "numRequestsRunning", "concurrency"]
AutoscalingEngine = Literal["kvpilot", "hpa", "keda"]
# A Go duration as Kubernetes' CEL `duration()` reads it (e.g. 60s, 5m, 1m30s, 500ms).
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
