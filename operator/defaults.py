"""What the cluster's operator adds to every InferenceService that does not say otherwise: the
chart's `modelCache` (a cluster-wide default for `spec.model.cache`).

`kvpilot operator --default-model-cache-size 200Gi ...` validates the flags and hands them to the
handlers in one environment variable (kopf runs the handlers in the same process).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kvpilot.operator.api import InferenceService
from kvpilot.operator.api.model import ModelCacheSpec
from kvpilot.operator.model_cache import is_downloaded

MODEL_CACHE_ENV = "KVPILOT_DEFAULT_MODEL_CACHE"  # ModelCacheSpec as JSON (camelCase)


@dataclass(frozen=True)
class ClusterDefaults:
    model_cache: ModelCacheSpec | None = None

    def to_environ(self) -> dict[str, str]:
        if self.model_cache is None:
            return {}
        return {MODEL_CACHE_ENV: self.model_cache.model_dump_json(by_alias=True, exclude_none=True)}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> ClusterDefaults:
        text = environ.get(MODEL_CACHE_ENV)
        return cls(ModelCacheSpec.model_validate_json(text) if text else None)


NO_DEFAULTS = ClusterDefaults()


def with_cluster_defaults(isvc: InferenceService, defaults: ClusterDefaults) -> InferenceService:
    """The InferenceService as it runs: a downloaded model (hf://, s3://, gs://) without its own
    `spec.model.cache` gets the cluster's, so every pod stops downloading it again. The spec's own
    `cache` always wins; pvc:// and oci:// models are never cached."""
    if defaults.model_cache is None or isvc.spec.model.cache is not None or not is_downloaded(isvc):
        return isvc
    model = isvc.spec.model.model_copy(update={"cache": defaults.model_cache})
    return isvc.model_copy(update={"spec": isvc.spec.model_copy(update={"model": model})})
