"""Validation of the InferenceService API: field formats, and each cross-field rule written
once as a pair, the CEL `x-kubernetes-validations` rule the API server enforces at admission and
the same rule in Python, which the operator enforces on objects stored before a rule existed."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from kubernetes.utils.quantity import parse_quantity
from kvpilot.operator.api.constants import (
    DURATION_PATTERN,
    LABEL_VALUE_PATTERN,
    MODEL_URI_PATTERN,
    OPERATOR_LABEL_KEYS,
    QUANTITY_PATTERN,
)
from kvpilot.serving.contract import SERVE_SETTING
from pydantic import AfterValidator, BeforeValidator, Field


def _quantity_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def check_quantity(value: str) -> str:
    if not re.match(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a positive Kubernetes quantity (e.g. 16Gi, 500m, 2)")
    return value


def at_least(minimum: str) -> AfterValidator:
    """A quantity no smaller than `minimum` (after the format check)."""

    def check(value: str) -> str:
        if parse_quantity(value) < parse_quantity(minimum):
            raise ValueError(f"{value!r} is less than {minimum}")
        return value

    return AfterValidator(check)


def check_model_uri(value: str) -> str:
    if not re.match(MODEL_URI_PATTERN, value):
        raise ValueError(
            f"{value!r} is not pvc://CLAIM/path, hf://org/repo[@revision], s3://bucket/path, "
            "gs://bucket/path or oci://image"
        )
    return value


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def check_duration(value: str) -> str:
    if not re.match(DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration (e.g. 60s, 5m, 1m30s, 500ms)")
    return value


def duration_seconds(value: str) -> float:
    """Seconds of a Go duration such as `1m30s` (already checked by `check_duration`)."""
    return sum(
        float(number) * _DURATION_UNITS[unit] for number, unit in re.findall(r"([0-9.]+)(ms|s|m|h)", value)
    )


Duration = Annotated[
    str, AfterValidator(check_duration), Field(max_length=32, json_schema_extra={"pattern": DURATION_PATTERN})
]

# Checked at admission, not first by the API server refusing the pods' Deployment (ApplyRejected).
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]

# int-or-string in the schema (`cpu: 2` and `cpu: "500m"` are both valid), always a string here.
Quantity = Annotated[int | str, BeforeValidator(_quantity_to_str), AfterValidator(check_quantity)]


@dataclass(frozen=True)
class Rule:
    cel: str
    message: str
    field_path: str
    holds: Callable[[Any], bool]  # the same rule on the pydantic model

    def schema(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message, "fieldPath": self.field_path}


def cel_rules(rules: list[Rule]) -> dict[str, Any]:
    """The `json_schema_extra` that puts these rules into the CRD."""
    return {"x-kubernetes-validations": [rule.schema() for rule in rules]}


def enforce(model: Any, rules: list[Rule]) -> Any:
    for rule in rules:
        if not rule.holds(model):
            raise ValueError(rule.message)
    return model


API_KEY_ENV = SERVE_SETTING["api_key"].env  # the engine's key, from upstreamApiKeySecretRef

TENSOR_PARALLEL_UNSUPPORTED = (
    "spec.engine.tensorParallelSize: tensor parallelism is not supported yet (the bundled kvpilot server "
    "runs one device per replica); use 1 and scale out with replicas"
)

MODEL_RULES = [
    Rule(
        "!has(self.revision) || self.uri.startsWith('hf://')",
        "spec.model.revision applies to hf:// URIs only",
        ".revision",
        lambda model: model.revision is None or model.uri.startswith("hf://"),
    ),
    Rule(
        "!has(self.revision) || !self.uri.contains('@')",
        "set the revision either in spec.model.uri (@revision) or in spec.model.revision, not both",
        ".revision",
        lambda model: model.revision is None or "@" not in model.uri,
    ),
    Rule(
        "!has(self.cache) || self.uri.startsWith('hf://') || self.uri.startsWith('s3://') "
        "|| self.uri.startsWith('gs://')",
        "spec.model.cache applies to hf://, s3:// and gs:// models (the others are not downloaded)",
        ".cache",
        lambda model: model.cache is None or model.uri.split("://")[0] in ("hf", "s3", "gs"),
    ),
]

AUTOSCALING_RULES = [
    Rule(
        "self.minReplicas <= self.maxReplicas",
        "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas",
        ".minReplicas",
        lambda autoscaling: autoscaling.min_replicas <= autoscaling.max_replicas,
    ),
    Rule(
        "!has(self.panicWindow) || !has(self.stableWindow) || "
        "duration(self.panicWindow) <= duration(self.stableWindow)",
        "spec.autoscaling.panicWindow must not exceed spec.autoscaling.stableWindow",
        ".panicWindow",
        lambda a: duration_seconds(a.panic_window) <= duration_seconds(a.stable_window),
    ),
    Rule(
        "!has(self.panicWindow) || duration(self.panicWindow) > duration('0s')",
        "spec.autoscaling.panicWindow must be longer than 0s (and stableWindow at least panicWindow)",
        ".panicWindow",
        lambda a: duration_seconds(a.panic_window) > 0,
    ),
    Rule(
        "!has(self.engine) || self.engine != 'hpa' || self.minReplicas >= 1",
        "spec.autoscaling.minReplicas 0 needs engine kvpilot or keda: an HPA cannot scale to zero",
        ".minReplicas",
        lambda a: a.engine != "hpa" or a.min_replicas >= 1,
    ),
    Rule(
        "!has(self.engine) || self.engine != 'keda' || has(self.prometheus)",
        "spec.autoscaling.prometheus.address is required with engine keda (the ScaledObject's trigger)",
        ".prometheus",
        lambda a: a.engine != "keda" or a.prometheus is not None,
    ),
]

SPEC_RULES = [
    Rule(
        "!has(self.engine) || !has(self.engine.tensorParallelSize) || self.engine.tensorParallelSize == 1",
        TENSOR_PARALLEL_UNSUPPORTED,
        ".engine.tensorParallelSize",
        lambda spec: spec.engine.tensor_parallel_size == 1,
    ),
    Rule(
        # Constant-cost `in` checks: a loop over the map's keys could exceed the CEL cost budget.
        "!has(self.podLabels) || "
        + " && ".join(f"!('{key}' in self.podLabels)" for key in OPERATOR_LABEL_KEYS),
        "spec.podLabels must not set the operator's app.kubernetes.io/ labels",
        ".podLabels",
        lambda spec: not any(key in spec.pod_labels for key in OPERATOR_LABEL_KEYS),
    ),
    Rule(
        "!has(self.router) || !has(self.router.upstreamApiKeySecretRef) || !has(self.env) "
        f"|| !self.env.exists(e, e.name == '{API_KEY_ENV}')",
        f"spec.env must not set {API_KEY_ENV}: spec.router.upstreamApiKeySecretRef sets it",
        ".env",
        lambda spec: (
            spec.router.upstream_api_key_secret_ref is None
            or all(env.name != API_KEY_ENV for env in spec.env)
        ),
    ),
    Rule(
        "!has(self.tenants) || size(self.tenants) == 0 || !has(self.router) || !has(self.router.enabled) "
        "|| self.router.enabled",
        "spec.tenants need the router: remove spec.router.enabled: false",
        ".tenants",
        lambda spec: not spec.tenants or spec.router.enabled,
    ),
]

ACTIVATION_RULES = [
    Rule(
        "!has(self.timeout) || duration(self.timeout) >= duration('1s')",
        "spec.router.activation.timeout must be at least 1s",
        ".timeout",
        lambda activation: duration_seconds(activation.timeout) >= 1,
    ),
]

# A missing strategy is the default, Rolling (the CRD's default `{}` is checked before defaulting).
ROLLOUT_RULES = [
    Rule(
        "!has(self.steps) || size(self.steps) == 0 || (has(self.strategy) && self.strategy == 'Canary')",
        "spec.rollout.steps apply to strategy Canary only",
        ".steps",
        lambda rollout: not rollout.steps or rollout.strategy == "Canary",
    ),
    Rule(
        "!has(self.strategy) || self.strategy != 'Canary' || (has(self.steps) && size(self.steps) > 0)",
        "spec.rollout.steps: strategy Canary needs at least one step",
        ".steps",
        lambda rollout: rollout.strategy != "Canary" or bool(rollout.steps),
    ),
    Rule(
        "!has(self.analysis) || (has(self.strategy) && self.strategy != 'Rolling')",
        "spec.rollout.analysis applies to strategies Canary and BlueGreen",
        ".analysis",
        lambda rollout: rollout.analysis is None or rollout.strategy != "Rolling",
    ),
]
