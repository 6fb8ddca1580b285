"""One reconcile against the API emulator: revisions, status, idempotence; a model that does not
fit and a rejected apply stall with their numbers or the API server's message, and neither is
retried for the same spec."""

import datetime
import http.server
import threading
from typing import Any

import kubernetes.client
import pytest
from kvpilot.operator.api import InferenceService
from kvpilot.operator.executor import KubeClient
from kvpilot.operator.reconciler import reconcile
from kvpilot.operator.revision import revision_hash

ISVC = ("kvpilot.dev/v1alpha1", "inferenceservices")
NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def client(apiserver) -> KubeClient:
    configuration = kubernetes.client.Configuration(host=apiserver.url)
    return KubeClient(kubernetes.client.ApiClient(configuration))


def stored(kubectl, namespace: str, **spec) -> dict:
    body = {
        "apiVersion": ISVC[0],
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": namespace},
    }
    body["spec"] = {"model": {"name": "smollm2", "uri": "pvc://models/smollm2"}, "replicas": 2, **spec}
    kubectl.create(*ISVC, namespace, body)
    return kubectl.get(*ISVC, namespace, "chat")


def test_the_first_revision_gets_its_deployment_and_status_then_nothing_more_is_written(client, kubectl):
    body = stored(kubectl, "rec-idem")
    outcome = reconcile(body, client, NOW)
    assert outcome.status_written and [e.reason for e in outcome.events] == ["FirstRevision"]
    (deployment,) = [
        d
        for d in kubectl.list("apps/v1", "deployments", "rec-idem")
        if d["metadata"]["name"] != "chat-router"
    ]
    revision = deployment["metadata"]["labels"]["kvpilot.dev/revision"]
    assert deployment["metadata"]["name"] == f"chat-{revision}" and deployment["spec"]["replicas"] == 2
    (event,) = [e for e in kubectl.list("v1", "events", "rec-idem") if e["reason"] == "FirstRevision"]
    assert (event["type"], event["involvedObject"]["name"]) == ("Normal", "chat")
    # The Deployment controller reports the pods ready: status follows once, then stays put.
    ready = {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "observedGeneration": 1}
    kubectl.patch("apps/v1", "deployments", "rec-idem", f"chat-{revision}", {"status": ready}, sub="status")
    assert reconcile(kubectl.get(*ISVC, "rec-idem", "chat"), client, NOW).status_written
    status = kubectl.get(*ISVC, "rec-idem", "chat")["status"]
    assert (status["rollout"]["phase"], status["rollout"]["stableRevision"]) == ("Promoted", revision)
    assert [(r["hash"], r["phase"], r["readyReplicas"], r["weight"]) for r in status["revisions"]] == [
        (revision, "Active", 2, 100)
    ]
    again = reconcile(kubectl.get(*ISVC, "rec-idem", "chat"), client, NOW + datetime.timedelta(seconds=30))
    assert not again.status_written and again.events == []


def mark_ready(kubectl, namespace: str, name: str, ready: int) -> None:
    """What the Deployment controller would report."""
    status = {"replicas": ready, "readyReplicas": ready, "updatedReplicas": ready, "observedGeneration": 1}
    kubectl.patch("apps/v1", "deployments", namespace, name, {"status": status}, sub="status")


def deployments(kubectl, namespace: str) -> dict[str, int]:
    """The engine's Deployments (not the router's)."""
    return {
        d["metadata"]["name"]: d["spec"]["replicas"]
        for d in kubectl.list("apps/v1", "deployments", namespace)
        if d["metadata"]["name"] != "chat-router"
    }


def test_a_spec_change_rolls_through_revisions_and_retires_the_old_one(client, kubectl):
    ns = "rec-roll"
    reconcile(stored(kubectl, ns), client, NOW)
    (old,) = deployments(kubectl, ns)
    mark_ready(kubectl, ns, old, 2)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    kubectl.patch(*ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})
    outcome = reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert [e.reason for e in outcome.events] == ["RolloutStarted"]
    (new,) = set(deployments(kubectl, ns)) - {old}
    assert deployments(kubectl, ns) == {old: 2, new: 1}  # one surge pod
    status = kubectl.get(*ISVC, ns, "chat")["status"]
    assert status["rollout"]["phase"] == "Progressing"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "False", "Reconciling": "True", "Stalled": "False",
    }  # fmt: skip
    for ready_new, expected in ((1, {old: 1, new: 2}), (2, {old: 0, new: 2})):
        mark_ready(kubectl, ns, new, ready_new)
        mark_ready(kubectl, ns, old, 2 - ready_new)
        reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
        assert deployments(kubectl, ns) == expected
    assert kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]["phase"] == "Promoted"
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert deployments(kubectl, ns) == {new: 2}  # the retired revision's Deployment, at 0, is deleted
    revisions = kubectl.get(*ISVC, ns, "chat")["status"]["revisions"]
    assert [(r["name"], r["phase"]) for r in revisions] == [(new, "Active"), (old, "Retired")]

    # rollbackTo the remembered revision: its pods come back, from its remembered spec.
    old_hash = revisions[1]["hash"]
    kubectl.patch(*ISVC, ns, "chat", {"spec": {"rollout": {"rollbackTo": old_hash}}})
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert deployments(kubectl, ns)[old] == 1
    args = kubectl.get("apps/v1", "deployments", ns, old)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--max-num-seqs" not in args


def test_rollback_to_an_unknown_revision_stalls_naming_the_field(client, kubectl):
    outcome = reconcile(stored(kubectl, "rec-unknown", rollout={"rollbackTo": "0123456789"}), client, NOW)
    assert outcome.error.startswith("spec.rollout.rollbackTo: revision 0123456789 is not remembered")
    stalled = kubectl.get(*ISVC, "rec-unknown", "chat")["status"]["conditions"]
    assert ("Stalled", "True", "InvalidSpec") in [(c["type"], c["status"], c["reason"]) for c in stalled]


def test_blue_green_serves_a_preview_service_until_the_promote(client, kubectl):
    ns = "rec-bg"
    reconcile(stored(kubectl, ns, rollout={"strategy": "BlueGreen"}), client, NOW)
    (old,) = deployments(kubectl, ns)
    mark_ready(kubectl, ns, old, 2)
    kubectl.patch(*ISVC, ns, "chat", {"spec": {"image": "kvpilot:0.2"}})
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    (new,) = set(deployments(kubectl, ns)) - {old}
    assert deployments(kubectl, ns) == {old: 2, new: 2}  # the full count, at weight 0
    preview = kubectl.get("v1", "services", ns, "chat-preview")
    assert preview["spec"]["selector"]["kvpilot.dev/revision"] == new.removeprefix("chat-")
    mark_ready(kubectl, ns, new, 2)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    rollout = kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]
    assert (rollout["phase"], rollout["reason"]) == ("Paused", "AwaitingPromote")
    kubectl.patch(
        *ISVC,
        ns,
        "chat",
        {
            "metadata": {
                "annotations": {"kvpilot.dev/promote": f"{rollout['revision']}/0@{rollout['startedAt']}"}
            }
        },
    )
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]["phase"] == "Promoted"
    assert deployments(kubectl, ns) == {old: 0, new: 2}
    assert kubectl.get("v1", "services", ns, "chat-preview") is None


def test_a_deployment_from_before_revisions_serves_until_the_first_revision_is_ready(client, kubectl):
    ns = "rec-legacy"
    body = stored(kubectl, ns)
    legacy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "chat",
            "labels": {"app.kubernetes.io/name": "kvpilot", "app.kubernetes.io/instance": "chat",
                       "app.kubernetes.io/managed-by": "kvpilot-operator"},
            "ownerReferences": [{"apiVersion": ISVC[0], "kind": "InferenceService", "name": "chat",
                                 "uid": body["metadata"]["uid"], "controller": True}],
        },
        "spec": {"replicas": 2},
    }  # fmt: skip
    kubectl.create("apps/v1", "deployments", ns, legacy)
    reconcile(body, client, NOW)
    (new,) = set(deployments(kubectl, ns)) - {"chat"}
    assert deployments(kubectl, ns) == {"chat": 2, new: 2}
    mark_ready(kubectl, ns, new, 1)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert "chat" in deployments(kubectl, ns)
    mark_ready(kubectl, ns, new, 2)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert deployments(kubectl, ns) == {new: 2}


def autoscaler_decides(kubectl, client: KubeClient, namespace: str, desired: int) -> None:
    """What kvpilot's autoscaler does: record its total; outside a rollout also apply it to the
    serving revision's Deployment as its own field manager."""
    kubectl.patch(
        *ISVC, namespace, "chat", {"status": {"autoscaling": {"desiredReplicas": desired}}}, sub="status"
    )
    rollout = kubectl.get(*ISVC, namespace, "chat")["status"]["rollout"]
    if rollout["phase"] not in ("Progressing", "Paused") and rollout["revision"] == rollout["stableRevision"]:
        client.apply_replicas(namespace, f"chat-{rollout['stableRevision']}", desired, "kvpilot-autoscaler")


def test_the_autoscalers_total_is_left_alone_then_shared_by_weight_during_a_canary(client, kubectl):
    ns = "rec-autoscale"
    autoscaling = {"minReplicas": 1, "maxReplicas": 8, "target": 1}
    canary = {"strategy": "Canary", "steps": [{"weight": 25, "pause": "manual"}]}
    reconcile(stored(kubectl, ns, autoscaling=autoscaling, rollout=canary), client, NOW)
    (old,) = deployments(kubectl, ns)
    assert deployments(kubectl, ns) == {old: 1}  # created at minReplicas
    mark_ready(kubectl, ns, old, 1)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    # Outside a rollout the autoscaler sets the serving revision's replicas; reconciles keep them.
    autoscaler_decides(kubectl, client, ns, 4)
    mark_ready(kubectl, ns, old, 4)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert deployments(kubectl, ns) == {old: 4}
    assert kubectl.get(*ISVC, ns, "chat")["status"]["desiredReplicas"] == 4

    # A canary at 25%: the planner shares the autoscaler's total, ceil(N x weight / 100) each.
    kubectl.patch(*ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    (new,) = set(deployments(kubectl, ns)) - {old}
    assert deployments(kubectl, ns) == {old: 4, new: 1}
    mark_ready(kubectl, ns, new, 1)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert deployments(kubectl, ns) == {old: 3, new: 1}
    assert kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]["canaryWeight"] == 25
    # The autoscaler decides 8 mid-canary: it writes no Deployment; the planner shares 8 by weight.
    autoscaler_decides(kubectl, client, ns, 8)
    assert deployments(kubectl, ns) == {old: 3, new: 1}
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert deployments(kubectl, ns)[new] == 2  # ceil(8 x 25 / 100)
    assert deployments(kubectl, ns)[old] >= 6  # ceil(8 x 75 / 100), more while new pods load
    status = kubectl.get(*ISVC, ns, "chat")["status"]
    assert status["rollout"]["replicas"] == status["desiredReplicas"] == 8
    assert status["autoscaling"] == {"desiredReplicas": 8}  # the reconciler leaves the autoscaler's record


class CountingClient(KubeClient):
    """The real client, counting the plans it executes."""

    executed = 0

    def execute(self, plan):
        self.executed += 1
        return super().execute(plan)


@pytest.fixture
def counting_client(apiserver) -> CountingClient:
    return CountingClient(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=apiserver.url)))


def stored_hf(kubectl, namespace: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "kvpilot.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": namespace, "generation": 1},
        # Without the router: these reconciles never get as far as its endpoints.
        "spec": {"model": {"name": "m", "uri": "hf://Qwen/Qwen3-32B"}, "router": {"enabled": False}, **spec},
    }
    return kubectl.create("kvpilot.dev/v1alpha1", "inferenceservices", namespace, body)


def stalled(kubectl, namespace: str) -> dict[str, Any]:
    obj = kubectl.get("kvpilot.dev/v1alpha1", "inferenceservices", namespace, "chat")
    (condition,) = [c for c in obj["status"]["conditions"] if c["type"] == "Stalled"]
    return {**condition, "fit": obj["status"].get("fit"), "status_body": obj["status"]}


def test_a_model_that_does_not_fit_stalls_before_anything_is_applied(counting_client, kubectl):
    spec = {
        "model": {"name": "m", "uri": "hf://Qwen/Qwen3-32B", "architecture": {"known": "Qwen3-32B"}},
        "engine": {"maxModelLen": 8192},
        "resources": {"gpu": {"count": 1, "memory": "48Gi"}},
    }
    body = stored_hf(kubectl, "rec-fit", **spec)
    outcome = reconcile(body, counting_client, NOW)
    numbers = "weights 61.0 GiB + KV cache 2.0 GiB for one 8192-token sequence > 43.2 GiB (0.9 of 48.0 GiB)"
    assert (outcome.reason, outcome.status_written) == ("InsufficientGPUMemory", True)
    assert outcome.error == f"spec.resources.gpu.memory: does not fit: {numbers}"
    condition = stalled(kubectl, "rec-fit")
    assert (condition["status"], condition["reason"]) == ("True", "InsufficientGPUMemory")
    assert condition["fit"] == f"does not fit: {numbers}"
    assert counting_client.executed == 0
    assert kubectl.list("apps/v1", "deployments", "rec-fit") == []


def test_a_cpu_replica_whose_memory_cannot_hold_the_server_stalls(counting_client, kubectl):
    spec = {
        "model": {
            "name": "m",
            "uri": "hf://HuggingFaceTB/SmolLM2-135M",
            "architecture": {"known": "SmolLM2-135M"},
        },
        "engine": {"maxModelLen": 2048},
        "resources": {"memory": "1Gi"},
    }
    body = stored_hf(kubectl, "rec-cpu-fit", **spec)
    outcome = reconcile(body, counting_client, NOW)
    numbers = (
        "weights 0.5 GiB + KV cache 0.1 GiB for one 2048-token sequence > 0.4 GiB (0.9 of 1.0 GiB memory - "
        "0.5 GiB for the server)"
    )
    assert (outcome.reason, outcome.error) == (
        "InsufficientMemory",
        f"spec.resources.memory: does not fit: {numbers}",
    )
    condition = stalled(kubectl, "rec-cpu-fit")
    assert (condition["status"], condition["reason"], condition["fit"]) == (
        "True",
        "InsufficientMemory",
        f"does not fit: {numbers}",
    )
    assert counting_client.executed == 0


def test_a_rejected_apply_is_not_retried_for_the_same_generation(counting_client, kubectl, apiserver):
    body = stored_hf(kubectl, "rec-422")
    revision = revision_hash(InferenceService.from_body(body).spec)
    apiserver.server[f"patch /apis/apps/v1/namespaces/rec-422/deployments/chat-{revision}"] << 422
    outcome = reconcile(body, counting_client, NOW)
    assert (outcome.reason, outcome.status_written) == ("ApplyRejected", True)
    assert outcome.error.startswith("apply Deployment: HTTP 422")
    condition = stalled(kubectl, "rec-422")
    assert (condition["status"], condition["reason"], condition["observedGeneration"]) == (
        "True",
        "ApplyRejected",
        1,
    )
    assert counting_client.executed == 1

    again = reconcile(
        {**body, "status": condition["status_body"]}, counting_client, NOW + datetime.timedelta(minutes=1)
    )
    assert (again.reason, again.status_written, counting_client.executed) == ("ApplyRejected", False, 1)
    # A spec change (a new generation) is applied again.
    changed = {**body, "metadata": {**body["metadata"], "generation": 2}, "status": condition["status_body"]}
    reconcile(changed, counting_client, NOW + datetime.timedelta(minutes=2))
    assert counting_client.executed == 2


class MetricsServer:
    """A real /metrics endpoint on 127.0.0.1 serving what `render` returns."""

    def __init__(self, render) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = render()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class RouterMetricsServer(MetricsServer):
    """The router's own metrics (serving/router/metering.py)."""

    def __init__(self) -> None:
        from kvpilot.serving.router.metering import RouterMetrics

        self.metrics = RouterMetrics()
        super().__init__(self.metrics.render)

    def answer(self, revision: str, code: str, count: int) -> None:
        self.metrics.requests.labels("smollm2", revision, "", code).inc(count)
        for _ in range(count):
            self.metrics.time_to_first_token.labels("smollm2", revision).observe(0.2)


class EngineMetricsServer(MetricsServer):
    """One engine pod's metrics (serving/api/metrics.py's names and TTFT buckets)."""

    def __init__(self) -> None:
        from kvpilot.serving.api.metrics import TTFT_BUCKETS
        from kvpilot.serving.contract import METRIC_REQUEST_SUCCESS, METRIC_TIME_TO_FIRST_TOKEN
        from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

        registry = CollectorRegistry()
        self.finished = Counter(
            METRIC_REQUEST_SUCCESS, "ok", ["model_name", "finished_reason"], registry=registry
        )
        self.ttft = Histogram(
            METRIC_TIME_TO_FIRST_TOKEN, "ttft", ["model_name"], buckets=TTFT_BUCKETS, registry=registry
        )
        super().__init__(lambda: generate_latest(registry))

    def answer(self, count: int, ttft: float) -> None:
        self.finished.labels("smollm2", "stop").inc(count)
        for _ in range(count):
            self.ttft.labels("smollm2").observe(ttft)


def router_pod(kubectl, namespace: str, port: int) -> None:
    """A ready router pod of `chat` whose `http` port is `port` on 127.0.0.1."""
    labels = {"app.kubernetes.io/name": "kvpilot-router", "app.kubernetes.io/instance": "chat"}
    container = {"name": "router", "image": "kvpilot", "ports": [{"name": "http", "containerPort": port}]}
    body = {"metadata": {"name": "chat-router-1", "labels": labels}, "spec": {"containers": [container]}}
    kubectl.create("v1", "pods", namespace, body)
    status = {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
    kubectl.patch("v1", "pods", namespace, "chat-router-1", {"status": status}, sub="status")


def test_a_canarys_analysis_reads_the_router_pods_metrics_and_rolls_back_on_its_error_rate(client, kubectl):
    """The reconciler lists the router pods, reads each one's /metrics (a real endpoint) and
    judges the canary on its revision's 5xx share there: two failed checks roll it back."""
    ns = "rec-analysis"
    analysis = {"interval": "1m", "maxErrorRate": 0.1, "minRequests": 10, "failureLimit": 2}
    canary = {"strategy": "Canary", "steps": [{"weight": 50, "pause": "1h"}], "analysis": analysis}
    reconcile(stored(kubectl, ns, rollout=canary), client, NOW)
    (old,) = deployments(kubectl, ns)
    mark_ready(kubectl, ns, old, 2)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    kubectl.patch(*ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    (new,) = set(deployments(kubectl, ns)) - {old}
    mark_ready(kubectl, ns, new, 1)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    rollout = kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]
    assert (rollout["canaryWeight"], rollout.get("lastAnalysis")) == (50, None)
    canary_revision, stable_revision = rollout["revision"], rollout["stableRevision"]

    router = RouterMetricsServer()
    router_pod(kubectl, ns, router.port)
    router.answer(canary_revision, "200", 40)
    router.answer(canary_revision, "500", 6)  # passed on from the canary's server
    router.answer(canary_revision, "502", 4)  # answered by the router itself for the canary
    router.answer(stable_revision, "500", 500)  # another revision's errors are not the canary's
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(seconds=1))
    rollout = kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]
    last = rollout["lastAnalysis"]
    assert (last["requests"], last["errorRate"], last["passed"]) == (50, 0.2, False)
    # All 50 first bytes in the (0.1, 0.25] bucket: rank 47.5 of 50 -> 0.1 + 0.15 * 47.5 / 50
    assert last["ttftP95"] == pytest.approx(0.2425)
    assert (rollout["phase"], rollout["failedChecks"]) == ("Progressing", 1)  # a timed pause

    router.answer(canary_revision, "200", 16)
    router.answer(canary_revision, "503", 4)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(seconds=62))
    rollout = kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]
    assert (rollout["phase"], rollout["reason"]) == ("RolledBack", "AnalysisFailed")
    last = rollout["lastAnalysis"]  # the interval since the previous check only
    assert (last["requests"], last["errorRate"], last["passed"]) == (20, 0.2, False)
    assert "2 failed analysis checks in a row" in rollout["message"]
    assert "error rate 0.200 > maxErrorRate 0.1" in rollout["message"]
    assert deployments(kubectl, ns) == {old: 2, new: 0}
    router.server.shutdown()


def engine_pod(kubectl, namespace: str, revision: str, port: int) -> None:
    """A ready engine pod of `revision` of `chat` whose `http` port is `port` on 127.0.0.1."""
    labels = {
        "app.kubernetes.io/name": "kvpilot",
        "app.kubernetes.io/instance": "chat",
        "app.kubernetes.io/managed-by": "kvpilot-operator",
        "kvpilot.dev/revision": revision,
    }
    container = {"name": "server", "image": "kvpilot", "ports": [{"name": "http", "containerPort": port}]}
    name = f"chat-{revision}-1"
    kubectl.create(
        "v1",
        "pods",
        namespace,
        {"metadata": {"name": name, "labels": labels}, "spec": {"containers": [container]}},
    )
    status = {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
    kubectl.patch("v1", "pods", namespace, name, {"status": status}, sub="status")


def test_a_blue_green_preview_is_checked_on_its_engine_pods_and_a_failing_one_is_never_promoted(
    client, kubectl
):
    """The preview is at weight 0: the router counts nothing for it (its requests come through
    `chat-preview`), so the checks read the new revision's own engine pods: TTFT and requests."""
    ns = "rec-bg-analysis"
    analysis = {"interval": "1m", "maxTTFTSeconds": {"p95": 1.0}, "minRequests": 10, "failureLimit": 2}
    reconcile(stored(kubectl, ns, rollout={"strategy": "BlueGreen", "analysis": analysis}), client, NOW)
    (old,) = deployments(kubectl, ns)
    mark_ready(kubectl, ns, old, 2)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    kubectl.patch(*ISVC, ns, "chat", {"spec": {"image": "kvpilot:0.2"}})
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    (new,) = set(deployments(kubectl, ns)) - {old}
    mark_ready(kubectl, ns, new, 2)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    rollout = kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]
    assert (rollout["phase"], rollout["reason"]) == ("Paused", "AwaitingPromote")
    preview, stable = rollout["revision"], rollout["stableRevision"]

    router = RouterMetricsServer()
    router_pod(kubectl, ns, router.port)
    router.answer(stable, "200", 500)  # the stable revision's traffic, none of it the preview's
    engine = EngineMetricsServer()
    engine_pod(kubectl, ns, preview, engine.port)
    engine.answer(20, ttft=3.0)  # requests sent to chat-preview
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=1))
    rollout = kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]
    last = rollout["lastAnalysis"]
    assert (last["requests"], last.get("errorRate"), last["passed"]) == (20, None, False)
    assert "TTFT p95" in last["message"] and rollout["failedChecks"] == 1

    engine.answer(30, ttft=3.0)
    promote = f"{preview}/0@{rollout['startedAt']}"  # as `kvpilot rollout promote` writes it
    kubectl.patch(*ISVC, ns, "chat", {"metadata": {"annotations": {"kvpilot.dev/promote": promote}}})
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=2))
    rollout = kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]
    assert (rollout["phase"], rollout["reason"]) == ("RolledBack", "AnalysisFailed")
    assert rollout["lastAnalysis"]["requests"] == 30  # the interval since the previous check
    assert deployments(kubectl, ns) == {old: 2, new: 0}
    assert kubectl.get("v1", "services", ns, "chat-preview") is None
    router.server.shutdown()
    engine.server.shutdown()


def test_an_abort_and_a_promote_given_by_the_cli_do_nothing_to_a_later_rollout_of_the_same_revision(
    client, kubectl, capsys
):
    """Nothing removes the annotations: set back and forth, the spec brings back b's hash, and
    the retry of b starts at its first step (not aborted at once, no step skipped)."""
    from kvpilot.serving.cli import main

    ns = "rec-commands"
    steps = [{"weight": 50, "pause": "manual"}, {"weight": 100, "pause": "manual"}]
    reconcile(stored(kubectl, ns, rollout={"strategy": "Canary", "steps": steps}), client, NOW)
    (old,) = deployments(kubectl, ns)
    mark_ready(kubectl, ns, old, 2)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)

    def to_b(minute: int) -> dict:
        kubectl.patch(*ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})
        reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=minute))
        (new,) = set(deployments(kubectl, ns)) - {old}
        mark_ready(kubectl, ns, new, 1)
        reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=minute + 1))
        return kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]

    rollout = to_b(1)
    assert (rollout["phase"], rollout["step"], rollout["canaryWeight"]) == ("Paused", 0, 50)
    assert main(["rollout", "promote", "chat", "-n", ns, "--full"]) == 0
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=3))
    assert kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]["step"] == 1
    assert main(["rollout", "abort", "chat", "-n", ns]) == 0
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=4))
    rollout = kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]
    assert (rollout["phase"], rollout["reason"]) == ("RolledBack", "Aborted")
    capsys.readouterr()

    kubectl.patch(*ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": None}}})  # back to a
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=5))
    assert kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]["reason"] == "BackToStable"
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=6))

    retry = to_b(7)  # both annotations still on the object
    assert (retry["phase"], retry["reason"], retry["step"]) == ("Paused", "AwaitingPromote", 0)
    assert retry["revision"] == rollout["revision"] and retry["startedAt"] != rollout["startedAt"]
    assert main(["rollout", "promote", "chat", "-n", ns]) == 0  # given for the retry: it acts
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=9))
    assert kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]["step"] == 1


def test_a_rollout_at_zero_replicas_proves_the_new_revision_with_one_pod_then_hands_back_zero(
    client, kubectl
):
    """Scaled to zero (autoscaler's total 0): the new revision gets one pod, the stable none; once
    it was ready it is promoted, and its replicas go back to the autoscaler, which holds 0."""
    ns = "rec-zero"
    autoscaling = {"minReplicas": 0, "maxReplicas": 2, "target": 1}
    reconcile(stored(kubectl, ns, autoscaling=autoscaling), client, NOW)
    (old,) = deployments(kubectl, ns)
    autoscaler_decides(kubectl, client, ns, 0)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    assert deployments(kubectl, ns) == {old: 0}
    kubectl.patch(*ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW)
    (new,) = set(deployments(kubectl, ns)) - {old}
    assert deployments(kubectl, ns) == {old: 0, new: 1}
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=1))
    assert kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]["phase"] == "Progressing"  # not ready yet
    mark_ready(kubectl, ns, new, 1)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=2))
    rollout = kubectl.get(*ISVC, ns, "chat")["status"]["rollout"]
    assert (rollout["phase"], rollout["message"]) == (
        "Promoted",
        f"revision {rollout['revision']} is stable (1/1 replicas ready)",
    )
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=3))
    assert deployments(kubectl, ns) == {new: 1}  # the autoscaler's now, at the running count
    autoscaler_decides(kubectl, client, ns, 0)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW + datetime.timedelta(minutes=4))
    assert deployments(kubectl, ns) == {new: 0}
