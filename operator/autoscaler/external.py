"""Pure builders for `autoscaling.engine: hpa | keda`: someone else's autoscaler scales the engine
Deployment from the same metric, target and policy (as far as each can express it).

- hpa: an autoscaling/v2 HorizontalPodAutoscaler with a Pods metric, served by a metrics adapter
  (prometheus-adapter: the rule in the README exposes the engine gauges under `HPA_METRIC_NAMES`);
- keda: a KEDA ScaledObject with a Prometheus trigger (`spec.autoscaling.prometheus`), which can
  also scale to and from zero.
"""

from __future__ import annotations

from typing import Any

from kvpilot.operator.api import InferenceService
from kvpilot.operator.api.spec import AutoscalingSpec
from kvpilot.operator.api.validation import duration_seconds
from kvpilot.operator.labels import child_metadata
from kvpilot.serving.contract import (
    METRIC_KV_CACHE_USAGE,
    METRIC_NUM_REQUESTS_RUNNING,
    METRIC_NUM_REQUESTS_WAITING,
    METRIC_ROUTER_QUEUED_REQUESTS,
    MODEL_NAME_LABEL,
    ROUTER_MODEL_LABEL,
)

# The custom-metrics names the README's prometheus-adapter rules give the engine's gauges.
HPA_METRIC_NAMES = {
    "kvCacheUsage": "vllm_kv_cache_usage_perc",
    "numRequestsWaiting": "vllm_num_requests_waiting",
    "numRequestsRunning": "vllm_num_requests_running",
    "concurrency": "kvpilot_concurrency",  # running + waiting per pod (the router's queue is not per pod)
}
POLICY_PERIOD_SECONDS = 15  # HPA's sync period: the rates apply per this period
MAX_STABILIZATION_SECONDS = 3600  # HPA's limit
KEDA_POLLING_SECONDS = 15


def target_quantity(value: float) -> str:
    """A resource.Quantity for a target (0.7 -> 700m), exact to a thousandth."""
    milli = round(value * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def behavior(spec: AutoscalingSpec) -> dict[str, Any]:
    """HPA's behaviour block from the policy: the up/down rates per sync period, and scaleDownDelay as
    the scale-down stabilization window."""
    up_percent = max(1, round((spec.max_scale_up_rate - 1) * 100))
    down_percent = min(100, max(1, round((1 - 1 / spec.max_scale_down_rate) * 100)))
    period = POLICY_PERIOD_SECONDS
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": up_percent, "periodSeconds": period},
                {"type": "Pods", "value": 1, "periodSeconds": period},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": min(
                MAX_STABILIZATION_SECONDS, round(duration_seconds(spec.scale_down_delay))
            ),
            "policies": [{"type": "Percent", "value": down_percent, "periodSeconds": period}],
        },
    }


def _target_ref(deployment: str) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment}


def build_horizontal_pod_autoscaler(isvc: InferenceService, deployment: str) -> dict[str, Any]:
    spec = isvc.spec.autoscaling
    assert spec is not None
    metric = {
        "type": "Pods",
        "pods": {
            "metric": {"name": HPA_METRIC_NAMES[spec.metric]},
            "target": {"type": "AverageValue", "averageValue": target_quantity(spec.target)},
        },
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": child_metadata(isvc),
        "spec": {
            "scaleTargetRef": _target_ref(deployment),
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [metric],
            "behavior": behavior(spec),
        },
    }


def prometheus_query(isvc: InferenceService) -> str:
    """The metric summed over this model's engine pods in the namespace (KEDA divides by replicas)."""
    spec = isvc.spec.autoscaling
    assert spec is not None
    if spec.prometheus is not None and spec.prometheus.query:
        return spec.prometheus.query
    namespace, model = isvc.metadata.namespace, isvc.spec.model.name
    engine = f'{{namespace="{namespace}",{MODEL_NAME_LABEL}="{model}"}}'
    gauges = {
        "kvCacheUsage": [METRIC_KV_CACHE_USAGE],
        "numRequestsWaiting": [METRIC_NUM_REQUESTS_WAITING],
        "numRequestsRunning": [METRIC_NUM_REQUESTS_RUNNING],
        "concurrency": [METRIC_NUM_REQUESTS_RUNNING, METRIC_NUM_REQUESTS_WAITING],
    }[spec.metric]
    terms = [f"{gauge}{engine}" for gauge in gauges]
    if spec.metric == "concurrency":
        terms.append(router_queue(isvc))
    # At zero replicas no engine series exist and a bare sum() is empty, which would make the whole
    # sum empty: KEDA would read 0 and never wake the model for the requests queued at the router.
    return " + ".join(f"(sum({term}) or vector(0))" for term in terms)


def router_queue(isvc: InferenceService) -> str:
    """The requests the model's routers hold while it has no ready engine pod."""
    labels = f'namespace="{isvc.metadata.namespace}",{ROUTER_MODEL_LABEL}="{isvc.spec.model.name}"'
    return f"{METRIC_ROUTER_QUEUED_REQUESTS}{{{labels}}}"


def _prometheus_trigger(address: str, query: str, threshold: float) -> dict[str, Any]:
    return {
        "type": "prometheus",
        "metricType": "AverageValue",
        "metadata": {"serverAddress": address, "query": query, "threshold": f"{threshold:g}"},
    }


def build_scaled_object(isvc: InferenceService, deployment: str) -> dict[str, Any]:
    """The metric's trigger; with minReplicaCount 0 and a query without the router's queue (any
    metric but concurrency, or the spec's own query), a second trigger on that queue: at zero
    replicas the engine's gauges do not exist, and only the queued requests can wake the model."""
    spec = isvc.spec.autoscaling
    assert spec is not None and spec.prometheus is not None
    address = spec.prometheus.address
    triggers = [_prometheus_trigger(address, prometheus_query(isvc), spec.target)]
    if spec.min_replicas == 0 and (spec.metric != "concurrency" or spec.prometheus.query):
        triggers.append(_prometheus_trigger(address, f"sum({router_queue(isvc)}) or vector(0)", 1))
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": child_metadata(isvc),
        "spec": {
            "scaleTargetRef": _target_ref(deployment),
            "minReplicaCount": spec.min_replicas,
            "maxReplicaCount": spec.max_replicas,
            "pollingInterval": KEDA_POLLING_SECONDS,
            "cooldownPeriod": max(1, round(duration_seconds(spec.scale_to_zero_after))),  # 0: KEDA's 300
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior(spec)}},
            "triggers": triggers,
        },
    }


def build_external_autoscaler(isvc: InferenceService, deployment: str) -> list[dict[str, Any]]:
    """The HPA or ScaledObject that `autoscaling.engine` asks for (none for kvpilot's own), scaling
    `deployment` (the serving revision's)."""
    engine = isvc.spec.autoscaling.engine if isvc.spec.autoscaling else None
    if engine == "hpa":
        return [build_horizontal_pod_autoscaler(isvc, deployment)]
    if engine == "keda":
        return [build_scaled_object(isvc, deployment)]
    return []
