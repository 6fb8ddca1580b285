"""`autoscaling.engine: hpa | keda`: the HPA passes kubernetes-validate, the ScaledObject KEDA's own
model (generated from its CRD), and the operator leaves the Deployment's replicas to either."""

from __future__ import annotations

import kubernetes_validate
import pytest
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from kvpilot.operator.autoscaler.external import prometheus_query, target_quantity
from kvpilot.operator.builders import build_children
from kvpilot.operator.revision import revision_deployment_name, revision_hash

from tests.operator.test_builders import K8S_VERSIONS, isvc

AUTOSCALING = {"minReplicas": 1, "maxReplicas": 6, "target": 0.7, "scaleDownDelay": "2m"}
PROMETHEUS = {"address": "http://prometheus.monitoring:9090"}


def children(**autoscaling) -> dict[str, dict]:
    """The engine's children (the serving revision's Deployment, the HPA or ScaledObject), by kind."""
    service = isvc(autoscaling={**AUTOSCALING, **autoscaling})
    built = build_children(service)
    names = ("chat", revision_deployment_name(service, revision_hash(service.spec)))
    return {child["kind"]: child for child in built if child["metadata"]["name"] in names}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "metric", ["kvCacheUsage", "numRequestsWaiting", "numRequestsRunning", "concurrency"]
)
def test_hpa_targets_the_deployment_with_a_pods_metric_and_passes_kubernetes_validate(metric, version):
    built = children(engine="hpa", metric=metric)
    hpa = built["HorizontalPodAutoscaler"]
    kubernetes_validate.validate(hpa, version, strict=True)
    spec = hpa["spec"]
    name = built["Deployment"]["metadata"]["name"]  # the serving revision's, <name>-<revision>
    assert name.startswith("chat-")
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 6)
    (pods_metric,) = spec["metrics"]
    assert pods_metric["type"] == "Pods"
    assert pods_metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "700m"}
    assert pods_metric["pods"]["metric"]["name"].replace("_", ":", 1).startswith(("vllm:", "kvpilot:"))
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120  # scaleDownDelay
    assert spec["behavior"]["scaleUp"]["policies"][0] == {
        "type": "Percent",
        "value": 100,
        "periodSeconds": 15,
    }
    assert "replicas" not in built["Deployment"]["spec"]
    assert "ScaledObject" not in built


@pytest.mark.parametrize("metric", ["kvCacheUsage", "concurrency"])
def test_keda_scaled_object_matches_kedas_schema(metric):
    built = children(engine="keda", metric=metric, minReplicas=0, prometheus=PROMETHEUS)
    scaled = built["ScaledObject"]
    # KEDA's model keeps every field we set, with the type we gave it (an unknown field would drop).
    parsed = ScaledObject.model_validate(scaled)
    assert parsed.model_dump(by_alias=True, exclude_none=True, mode="json") == scaled
    spec = scaled["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 6, 300)
    trigger = spec["triggers"][0]  # (and the router queue's, below)
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["serverAddress"] == PROMETHEUS["address"]
    assert trigger["metadata"]["threshold"] == "0.7"
    assert "replicas" not in built["Deployment"]["spec"]
    assert "HorizontalPodAutoscaler" not in built


@pytest.mark.parametrize(
    ("autoscaling", "wakes"),
    [
        ({"metric": "kvCacheUsage", "minReplicas": 0}, True),
        ({"metric": "numRequestsWaiting", "minReplicas": 0}, True),
        ({"metric": "concurrency", "minReplicas": 0}, False),  # its query holds the queue already
        ({"metric": "concurrency", "minReplicas": 0, "prometheus": {**PROMETHEUS, "query": "sum(x)"}}, True),
        ({"metric": "kvCacheUsage", "minReplicas": 1}, False),  # never at zero
    ],
)
def test_a_scaled_object_that_can_reach_zero_is_woken_by_the_routers_queue(autoscaling, wakes):
    """At zero replicas the engine's gauges do not exist: a kvCacheUsage query reads 0 however many
    requests the routers hold, and KEDA would never scale 0 -> 1."""
    scaled = children(engine="keda", **{"prometheus": PROMETHEUS, **autoscaling})["ScaledObject"]
    assert (
        ScaledObject.model_validate(scaled).model_dump(by_alias=True, exclude_none=True, mode="json")
        == scaled
    )
    triggers = scaled["spec"]["triggers"]
    queue = 'sum(kvpilot_router_queued_requests{namespace="team-a",model="smollm2"}) or vector(0)'
    wake = {**triggers[0], "metadata": {**triggers[0]["metadata"], "query": queue, "threshold": "1"}}
    assert triggers[1:] == ([wake] if wakes else [])


def test_prometheus_queries():
    concurrency = isvc(
        autoscaling={**AUTOSCALING, "engine": "keda", "metric": "concurrency", "prometheus": PROMETHEUS}
    )
    # Each term falls back to 0: with no engine pods (scaled to zero) their series do not exist,
    # and one empty sum() would empty the whole query, hiding the router's queue from KEDA.
    assert prometheus_query(concurrency) == (
        '(sum(vllm:num_requests_running{namespace="team-a",model_name="smollm2"}) or vector(0)) + '
        '(sum(vllm:num_requests_waiting{namespace="team-a",model_name="smollm2"}) or vector(0)) + '
        '(sum(kvpilot_router_queued_requests{namespace="team-a",model="smollm2"}) or vector(0))'
    )
    usage = isvc(autoscaling={**AUTOSCALING, "engine": "keda", "prometheus": PROMETHEUS})
    assert prometheus_query(usage) == (
        '(sum(vllm:kv_cache_usage_perc{namespace="team-a",model_name="smollm2"}) or vector(0))'
    )
    own = {**PROMETHEUS, "query": "sum(my_metric)"}
    assert (
        prometheus_query(isvc(autoscaling={**AUTOSCALING, "engine": "keda", "prometheus": own}))
        == "sum(my_metric)"
    )


def test_the_operators_own_autoscaler_needs_no_child():
    kinds = {child["kind"] for child in build_children(isvc(autoscaling=AUTOSCALING))}
    assert "Deployment" in kinds and not kinds & {"HorizontalPodAutoscaler", "ScaledObject"}
    assert "replicas" not in children()["Deployment"]["spec"]


@pytest.mark.parametrize("engine", ["hpa", "keda"])
def test_no_external_autoscaler_while_a_rollout_owns_the_replicas(engine):
    service = isvc(autoscaling={**AUTOSCALING, "engine": engine, "prometheus": PROMETHEUS})
    kinds = {child["kind"] for child in build_children(service, external_autoscaler=False)}
    assert "Deployment" in kinds and not kinds & {"HorizontalPodAutoscaler", "ScaledObject"}
    kinds = {child["kind"] for child in build_children(service)}
    assert kinds & {"HorizontalPodAutoscaler", "ScaledObject"}


@pytest.mark.parametrize(("value", "quantity"), [(0.7, "700m"), (2, "2"), (0.05, "50m"), (12.5, "12500m")])
def test_target_quantity(value, quantity):
    assert target_quantity(value) == quantity


def test_a_sub_second_scale_to_zero_delay_is_not_kedas_default():
    """KEDA reads cooldownPeriod 0 as unset (its default, 300 s)."""
    scaled = children(engine="keda", minReplicas=0, prometheus=PROMETHEUS, scaleToZeroAfter="200ms")
    assert scaled["ScaledObject"]["spec"]["cooldownPeriod"] == 1
