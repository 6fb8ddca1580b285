"""The InferenceService API (kvpilot.dev/v1alpha1), defined once: the CRD schema in crds/ is
generated from these models (`kvpilot crd`), and the operator parses every object with them.

- `constants`: group, version, kind, defaults and formats;
- `validation`: field formats and each cross-field rule as a CEL rule beside its Python twin;
- `spec`: the parts of the spec; `rollout`: spec.rollout and the rollout's status;
  `types`: the spec and the object; `status`: what the operator writes back.
"""

from kvpilot.operator.api.constants import (
    API_VERSION,
    DEFAULT_CUDA_IMAGE,
    DEFAULT_GPU_RESOURCE,
    DEFAULT_IMAGE,
    DNS_LABEL_PATTERN,
    GROUP,
    KIND,
    NAME_MAX_LENGTH,
    OPERATOR_LABEL_KEYS,
    PLURAL,
    QUANTITY_PATTERN,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
)
from kvpilot.operator.api.rollout import (
    AnalysisResult,
    AnalysisSpec,
    HistoryEntry,
    RevisionStatus,
    RolloutSpec,
    RolloutStatus,
    RolloutStep,
)
from kvpilot.operator.api.spec import EngineSpec
from kvpilot.operator.api.status import Condition, InferenceServiceStatus
from kvpilot.operator.api.types import InferenceService, InferenceServiceSpec
from kvpilot.operator.api.validation import TENSOR_PARALLEL_UNSUPPORTED

__all__ = [
    "API_VERSION",
    "DEFAULT_CUDA_IMAGE",
    "DEFAULT_GPU_RESOURCE",
    "DEFAULT_IMAGE",
    "DNS_LABEL_PATTERN",
    "GROUP",
    "KIND",
    "NAME_MAX_LENGTH",
    "OPERATOR_LABEL_KEYS",
    "PLURAL",
    "QUANTITY_PATTERN",
    "SHORT_NAMES",
    "SINGULAR",
    "TENSOR_PARALLEL_UNSUPPORTED",
    "VERSION",
    "AnalysisResult",
    "AnalysisSpec",
    "Condition",
    "EngineSpec",
    "HistoryEntry",
    "InferenceService",
    "InferenceServiceSpec",
    "InferenceServiceStatus",
    "RevisionStatus",
    "RolloutSpec",
    "RolloutStatus",
    "RolloutStep",
]
