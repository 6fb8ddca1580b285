"""The autoscaler's gathering and reporting: /metrics as the engine and the router write it, which
pods count, one sample from many pods, status.autoscaling; then the loop's tick
against the API emulator with a real metrics endpoint (and with none answering)."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket

import httpx
import kubernetes.client
import pytest
from kvpilot.operator.autoscaler.decision import Decision, State
from kvpilot.operator.autoscaler.loop import Autoscaler
from kvpilot.operator.autoscaler.replay import RecordedSample
from kvpilot.operator.autoscaler.report import ScaleWrite, autoscaling_status, worth_writing
from kvpilot.operator.autoscaler.scrape import (
    EngineReading,
    build_sample,
    counted_pods,
    metrics_url,
    parse_engine_metrics,
    parse_router_queued,
)
from kvpilot.operator.executor import KubeClient
from kvpilot.operator.labels import AUTOSCALER_MANAGER
from kvpilot.serving.api.metrics import ServerMetrics
from kvpilot.serving.engine.stats import EngineStats
from kvpilot.serving.router.metering import RouterMetrics
from prometheus_client import generate_latest, start_http_server

T0 = 1_800_000_000.0


def engine_metrics(running: int, waiting: int, usage: float) -> ServerMetrics:
    """The server's own /metrics registry, fed these engine stats."""
    metrics = ServerMetrics("smollm2")
    stats = EngineStats(running, waiting, usage, 100, 16, 0, 0, 0, 0, 0)
    metrics.attach_engine(lambda: stats, weight_bytes=1)
    return metrics


def test_engine_gauges_are_read_from_the_servers_own_metrics():
    text = generate_latest(engine_metrics(3, 2, 0.25).registry).decode()
    assert parse_engine_metrics(text) == EngineReading(running=3.0, waiting=2.0, kv_cache_usage=0.25)
    assert parse_engine_metrics('# a router\nkvpilot_router_queued_requests{model="m"} 1\n') is None
    assert parse_engine_metrics("not { prometheus") is None


def test_router_queue_is_read_for_this_model_only():
    metrics = RouterMetrics()  # the router's own /metrics registry
    metrics.queued.labels("smollm2").set(3)
    metrics.queued.labels("other").set(7)
    text = generate_latest(metrics.registry).decode()
    assert parse_router_queued(text, "smollm2") == 3.0
    assert parse_router_queued(text, "absent") == 0.0
    assert parse_router_queued("vllm:num_requests_running 1\n", "smollm2") is None


def pod(name: str, ready: bool = True, since: float = T0 - 60, ip: str = "10.0.0.1", **meta) -> dict:
    stamp = datetime.datetime.fromtimestamp(since, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {"name": name, **meta},
        "spec": {"containers": [{"name": "server", "ports": [{"name": "http", "containerPort": 8000}]}]},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": str(ready), "lastTransitionTime": stamp}],
        },
    }


def test_only_ready_settled_running_pods_count():
    pods = [
        pod("ready"),
        pod("not-ready", ready=False),
        pod("just-ready", since=T0 - 5),
        pod("terminating", deletionTimestamp="2027-01-01T00:00:00Z"),
    ]
    assert [p["metadata"]["name"] for p in counted_pods(pods, T0, 0)] == ["ready", "just-ready"]
    assert [p["metadata"]["name"] for p in counted_pods(pods, T0, initial_delay=30)] == ["ready"]
    assert metrics_url(pods[0]) == "http://10.0.0.1:8000/metrics"


@pytest.mark.parametrize(
    ("ready", "readings", "current", "expected"),
    [
        (2, [EngineReading(2, 1, 0.5), EngineReading(4, 0, 0.7)], 2, (6.0, 1.0, 0.6)),
        (3, [EngineReading(2, 1, 0.5), None], 3, (6.0, 3.0, 0.5)),  # one of three did not answer
        (2, [None, None], 2, (None, None, None)),  # none answered: not measured
        (0, [], 1, (None, None, None)),  # replicas starting: not measured
        (0, [], 0, (0.0, 0.0, 0.0)),  # at zero: nothing runs
    ],
)
def test_one_sample_from_many_pods(ready, readings, current, expected):
    sample = build_sample(T0, ready, readings, queued=4.0, current=current)
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == expected
    assert (sample.ready_replicas, sample.queued) == (ready, 4.0)


def decision(desired: int, **kw) -> Decision:
    return Decision(
        desired, kw.pop("mode", "stable"), kw.pop("reason", "why"), kw.pop("value", 1.5), State(), **kw
    )


def test_status_records_each_scale_keeps_ten_and_names_the_conditions():
    status = autoscaling_status(
        decision(3, limited="ScaleUpLimit"),
        "concurrency",
        2,
        ScaleWrite(True, "SucceededRescale", "ok"),
        {},
        4,
        "T1",
    )
    assert status["history"] == [
        {"time": "T1", "from": 2, "to": 3, "mode": "stable", "value": 1.5, "reason": "why"}
    ]
    assert (status["desiredReplicas"], status["currentReplicas"], status["lastScaleTime"]) == (3, 2, "T1")
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions == {
        "AbleToScale": ("True", "SucceededRescale"),
        "ScalingActive": ("True", "ValidMetricFound"),
        "ScalingLimited": ("True", "ScaleUpLimit"),
    }
    for step in range(12):
        status = autoscaling_status(
            decision(4 + step), "concurrency", 3 + step, ScaleWrite(True, "x", "y"), status, 4, f"T{step + 2}"
        )
    assert len(status["history"]) == 10 and status["history"][-1]["to"] == 15
    held = autoscaling_status(
        decision(15, active=False, active_reason="FailedGetMetrics", reason="no metrics"),
        "concurrency",
        15,
        ScaleWrite(True, "x", "y"),
        status,
        4,
        "T99",
    )
    assert held["history"] == status["history"] and held["lastScaleTime"] == status["lastScaleTime"]
    assert next(c for c in held["conditions"] if c["type"] == "ScalingActive")["message"] == "no metrics"
    failed = autoscaling_status(
        decision(16), "concurrency", 15, ScaleWrite(False, "FailedUpdateScale", "HTTP 403"), held, 4, "T100"
    )
    assert failed["history"] == held["history"]  # nothing was scaled
    assert next(c for c in failed["conditions"] if c["type"] == "AbleToScale")["status"] == "False"
    # Only a changed value: written when due.
    drifted = {**held, "currentValue": 9.0}
    assert not worth_writing(drifted, held, value_is_due=False) and worth_writing(drifted, held, True)


# The loop's tick against the API emulator.


@pytest.fixture
def kube(apiserver) -> KubeClient:
    return KubeClient(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=apiserver.url)))


SERVING = {"phase": "Promoted", "revision": "r1", "stableRevision": "r1", "replicas": 1}


def stored_isvc(kubectl, namespace: str, rollout: dict | None = None, **autoscaling) -> dict:
    """The InferenceService as the reconciler leaves it: status.rollout names the serving revision,
    whose Deployment (`chat-r1`) exists with 1 replica."""
    body = {
        "apiVersion": "kvpilot.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "model": {"name": "smollm2", "uri": "pvc://models/smollm2"},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "metric": "concurrency", "target": 2,
                            "stableWindow": "10s", "panicWindow": "4s", **autoscaling},
        },
    }  # fmt: skip
    stored = kubectl.create("kvpilot.dev/v1alpha1", "inferenceservices", namespace, body)
    for name in ("chat-r1", "chat-r2"):
        metadata = {"name": name, "namespace": namespace}
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata,
            "spec": {"replicas": 1},
        }
        kubectl.create("apps/v1", "deployments", namespace, deployment)
    return {**stored, "status": {"rollout": rollout or SERVING}}


def engine_pod(kubectl, namespace: str, port: int) -> None:
    body = pod("chat-1", since=T0 - 60, ip="127.0.0.1")
    body["metadata"]["labels"] = {"app.kubernetes.io/name": "kvpilot", "app.kubernetes.io/instance": "chat"}
    body["spec"]["containers"][0]["ports"][0]["containerPort"] = port
    kubectl.create("v1", "pods", namespace, body)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def ticks(autoscaler: Autoscaler, clock: Clock, key: tuple[str, str], count: int) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(count):
            await autoscaler.tick(http, key)
            clock.now += 2


def test_tick_scales_the_deployment_from_a_real_metrics_endpoint(kube, kubectl, tmp_path):
    namespace = "loop-scale"
    clock = Clock()
    autoscaler = Autoscaler(lambda: kube, clock=clock, record_dir=tmp_path)
    autoscaler.observe(None, stored_isvc(kubectl, namespace))
    server, thread = start_http_server(0, addr="127.0.0.1", registry=engine_metrics(6, 2, 0.9).registry)
    try:
        engine_pod(kubectl, namespace, server.server_port)
        asyncio.run(ticks(autoscaler, clock, (namespace, "chat"), 1))
    finally:
        server.shutdown()
        thread.join(timeout=5)
    # 8 in flight at a target of 2 wants 4; the burst panics; the 2x rate allows 2 from 1. Only the
    # serving revision's Deployment is scaled.
    assert kubectl.get("apps/v1", "deployments", namespace, "chat-r1")["spec"]["replicas"] == 2
    assert kubectl.get("apps/v1", "deployments", namespace, "chat-r2")["spec"]["replicas"] == 1
    status = kubectl.get("kvpilot.dev/v1alpha1", "inferenceservices", namespace, "chat")["status"][
        "autoscaling"
    ]
    assert (status["desiredReplicas"], status["currentReplicas"], status["mode"]) == (2, 1, "panic")
    assert status["currentValue"] == 8.0
    (entry,) = status["history"]
    assert (entry["from"], entry["to"]) == (1, 2) and "maxScaleUpRate 2 allows 2" in entry["reason"]
    (event,) = kubectl.list("v1", "events", namespace)
    assert event["reason"] == "SuccessfulRescale" and event["source"]["component"] == AUTOSCALER_MANAGER
    assert event["involvedObject"]["kind"] == "InferenceService" and "from 1 to 2" in event["message"]
    # The sample is recorded in the replay's format (no router here: no queued key).
    (line,) = (tmp_path / "loop-scale_chat.jsonl").read_text().splitlines()
    assert json.loads(line) == {
        "t": T0,
        "ready_replicas": 1,
        "running": 6.0,
        "waiting": 2.0,
        "kv_cache_usage": 0.9,
    }
    assert RecordedSample.model_validate_json(line).sample().total("concurrency") == 8.0


def test_during_a_rollout_the_tick_decides_the_total_and_writes_no_deployment(kube, kubectl):
    """The rollout planner owns every revision's replicas while a rollout runs: the autoscaler's
    total goes to status.autoscaling.desiredReplicas, which the planner shares by weight."""
    namespace = "loop-rollout"
    clock = Clock()
    autoscaler = Autoscaler(lambda: kube, clock=clock)
    canary = {"phase": "Progressing", "revision": "r2", "stableRevision": "r1", "replicas": 1}
    autoscaler.observe(None, stored_isvc(kubectl, namespace, rollout=canary))
    server, thread = start_http_server(0, addr="127.0.0.1", registry=engine_metrics(6, 2, 0.9).registry)
    try:
        engine_pod(kubectl, namespace, server.server_port)
        asyncio.run(ticks(autoscaler, clock, (namespace, "chat"), 1))
    finally:
        server.shutdown()
        thread.join(timeout=5)
    for name in ("chat-r1", "chat-r2"):
        assert kubectl.get("apps/v1", "deployments", namespace, name)["spec"]["replicas"] == 1
    status = kubectl.get("kvpilot.dev/v1alpha1", "inferenceservices", namespace, "chat")["status"][
        "autoscaling"
    ]
    assert (status["desiredReplicas"], status["currentReplicas"], status["mode"]) == (2, 1, "panic")


def test_tick_holds_when_no_pod_answers(kube, kubectl):
    namespace = "loop-hold"
    clock = Clock()
    autoscaler = Autoscaler(lambda: kube, clock=clock)
    autoscaler.observe(None, stored_isvc(kubectl, namespace, minReplicas=1))
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    engine_pod(kubectl, namespace, port)
    asyncio.run(ticks(autoscaler, clock, (namespace, "chat"), 3))
    assert kubectl.get("apps/v1", "deployments", namespace, "chat-r1")["spec"]["replicas"] == 1
    status = kubectl.get("kvpilot.dev/v1alpha1", "inferenceservices", namespace, "chat")["status"][
        "autoscaling"
    ]
    active = next(c for c in status["conditions"] if c["type"] == "ScalingActive")
    assert (active["status"], active["reason"]) == ("False", "FailedGetMetrics")
    assert "holding at 1" in active["message"] and status["history"] == []
    assert kubectl.list("v1", "events", namespace) == []


def test_the_watch_feeds_what_is_tracked():
    autoscaler = Autoscaler(lambda: None)
    body = {"metadata": {"name": "a", "namespace": "n"}, "spec": {"autoscaling": {"maxReplicas": 2}}}
    autoscaler.observe("ADDED", body)
    assert list(autoscaler.tracked) == [("n", "a")]
    autoscaler.observe("MODIFIED", {**body, "spec": {"autoscaling": {"maxReplicas": 2, "engine": "hpa"}}})
    assert autoscaler.tracked == {}
    autoscaler.observe("MODIFIED", body)
    autoscaler.observe("DELETED", body)
    assert autoscaler.tracked == {}
