"""Rollouts end to end: the real operator process on the real control plane (tests/cluster), the
engine pods as real `kvpilot serve` processes, the router (on by default) as a real `kvpilot
router` pod splitting the traffic by the planner's weights, `kvpilot rollout` as a real command
with the cluster's kubeconfig, and `kvpilot bench serve` as the traffic, through the router pod.

A canary of a second checkpoint walks its steps and is promoted by the CLI with no failed request,
both revisions answering; a revision whose model does not load is rolled back with no failed
request while the stable revision serves on; a canary whose server fails half of its requests
(`kvpilot serve --inject-error-rate`, a test aid, in `spec.engine.extraArgs`) is rolled back by
analysis of the router's per-revision error rate. The in-place capacity switch runs without the
router (it is about pods and GPUs, not traffic).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvpilot.operator.api import API_VERSION
from prometheus_client.parser import text_string_to_metric_families

from tests.checkpoints import build_checkpoint
from tests.cluster.harness import wait_for
from tests.cluster.processes import pid_alive
from tests.operator import test_operator_e2e as e2e
from tests.operator.test_operator_e2e import ISVC, isvc_condition, manifest, router_url

# The e2e suite's fixtures: namespace with the model volume, the operator process.
model_dir, kubectl, api, ns, operator = e2e.model_dir, e2e.kubectl, e2e.api, e2e.ns, e2e.operator

pytestmark = pytest.mark.timeout(420)
ROUTER = {"enabled": True, "replicas": 1}


@pytest.fixture(scope="module")
def second_checkpoint(model_dir, tokenizer_dir) -> str:
    """`smollm2-b` beside `smollm2` on the model volume: other weights (seed 1), same tokenizer."""
    build_checkpoint("llama", model_dir / "smollm2-b", tokenizer_dir, seed=1)
    return "pvc://models/smollm2-b"


def rollout_of(api, ns: str) -> dict[str, Any]:
    return ((api.get(API_VERSION, ISVC, ns, "chat") or {}).get("status") or {}).get("rollout") or {}


def kvpilot_rollout(cluster, *args: str) -> subprocess.CompletedProcess:
    """`kvpilot rollout ...` as a user runs it: its own process, the cluster's kubeconfig."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    command = [sys.executable, "-m", "kvpilot.serving.cli", "rollout", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def revision_deployments(api, ns: str) -> dict[str, int]:
    return {
        d["metadata"]["labels"]["kvpilot.dev/revision"]: d["spec"]["replicas"]
        for d in api.list("apps/v1", "deployments", ns)
        if "kvpilot.dev/revision" in d["metadata"]["labels"]
    }


def events(api, ns: str) -> list[tuple[str, str]]:
    return [
        (e["type"], e["reason"])
        for e in api.list("v1", "events", ns)
        if e["involvedObject"]["name"] == "chat"
    ]


def router_requests(base_url: str) -> dict[tuple[str, str], float]:
    """The router's `kvpilot_router_requests_total` by (revision, code)."""
    counted: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "kvpilot_router_requests_total":
                key = (sample.labels["revision"], sample.labels["code"])
                counted[key] = counted.get(key, 0.0) + sample.value
    return counted


def engine_pods_of(api, ns: str, revision: str) -> list[dict[str, Any]]:
    return api.list("v1", "pods", ns, labelSelector=f"kvpilot.dev/revision={revision}")


def engine_pids(api, ns: str) -> list[int]:
    """The engine pods' processes (not the router's)."""
    pods = api.list("v1", "pods", ns, labelSelector="app.kubernetes.io/name=kvpilot")
    ids = [
        s.get("containerID", "") for p in pods for s in (p.get("status") or {}).get("containerStatuses") or []
    ]
    return [int(i.removeprefix("process://")) for i in ids if i]


class BenchTraffic:
    """`kvpilot bench serve` against the router, run after run in a thread until stopped (about
    4 requests/s, 10 s a run); each run's results (its --json) are kept, so every request sent
    is accounted for."""

    def __init__(self, base_url: str, tokenizer: Path, out_dir: Path) -> None:
        self.base_url, self.tokenizer, self.out_dir = base_url, tokenizer, out_dir
        self.runs: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        self.process: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> BenchTraffic:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        """Stop after the run in flight, which is kept."""
        self.stopping.set()
        self.thread.join(timeout=240)

    def cut_short(self) -> None:
        """Stop now: the run in flight is killed and left out (for a test done with the traffic)."""
        self.stopping.set()
        if self.process is not None:
            self.process.kill()
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            result = self.out_dir / f"bench-{len(self.runs)}.json"
            command = [
                sys.executable, "-m", "kvpilot.serving.cli", "bench", "serve", "--base-url", self.base_url,
                "--model", "smollm2", "--tokenizer", str(self.tokenizer), "--num-prompts", "40",
                "--request-rate", "4", "--max-concurrency", "2", "--input-len", "16", "--output-len", "4",
                "--json", str(result),
            ]  # fmt: skip
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            output, _ = self.process.communicate(timeout=180)
            if self.process.returncode < 0:  # killed by cut_short
                return
            run = json.loads(result.read_text()) if result.exists() else {"completed": 0, "errors": -1}
            self.runs.append({**run, "returncode": self.process.returncode, "output": output[-2000:]})

    @property
    def completed(self) -> int:
        return sum(run["completed"] for run in self.runs)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The runs with a failed request (or that could not run at all)."""
        return [run for run in self.runs if run["errors"] != 0 or run["returncode"] not in (0, 1)]


def test_a_canary_of_a_second_checkpoint_walks_its_steps_under_traffic_and_the_cli_promotes_it(
    cluster, api, ns, operator, model_dir, second_checkpoint, tmp_path
):
    steps = [{"weight": 50, "pause": "manual"}, {"weight": 100, "pause": "2s"}]
    rollout = {"strategy": "Canary", "steps": steps}
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=2, router=ROUTER, rollout=rollout))
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=180)
    stable = rollout_of(api, ns)["stableRevision"]
    url = router_url(api, ns)

    with BenchTraffic(url, model_dir / "smollm2", tmp_path) as traffic:
        api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"model": {"uri": second_checkpoint}}})
        paused = wait_for(
            lambda: rollout_of(api, ns).get("phase") == "Paused" and rollout_of(api, ns),
            "step 1 reached",
            timeout=180,
        )
        canary = paused["revision"]
        assert canary != stable and (paused["step"], paused["canaryWeight"]) == (0, 50)
        assert paused["reason"] == "AwaitingPromote"
        # ceil(2 * 50%) = 1 pod each once the canary's pod is ready.
        wait_for(lambda: revision_deployments(api, ns) == {stable: 1, canary: 1}, "1 + 1 pods")
        assert isvc_condition(api, ns, "Reconciling")["status"] == "True"
        assert isvc_condition(api, ns, "Ready")["reason"] == "RolloutPaused"
        # The router splits the bench's requests between the two checkpoints.
        wait_for(
            lambda: router_requests(url).get((canary, "200"), 0) >= 4, "the canary answering", timeout=120
        )
        split = router_requests(url)  # (the stable revision's series go once it leaves the router)
        assert split.get((stable, "200"), 0) > 0, split
        assert {code for _, code in split} <= {"200", "499"}, split

        shown = kvpilot_rollout(cluster, "status", "chat", "-n", ns)
        assert shown.returncode == 0, shown.stderr
        assert (
            "Paused (AwaitingPromote)" in shown.stdout
            and f"Revision:   {canary} (weight 50%, step 1)" in shown.stdout
        )

        promoted = kvpilot_rollout(cluster, "promote", "chat", "-n", ns)
        assert promoted.returncode == 0, promoted.stderr
        wait_for(lambda: rollout_of(api, ns).get("phase") == "Promoted", "the promotion", timeout=180)
        wait_for(lambda: revision_deployments(api, ns) == {canary: 2}, "the old revision deleted", timeout=60)
        # (the bench run in flight when the traffic stops runs on: it spans the old pods' drain)
        wait_for(lambda: not engine_pods_of(api, ns, stable), "the old revision's pods gone", timeout=90)

    assert traffic.failed == [] and traffic.completed >= 16, traffic.failed
    counted = router_requests(url)
    assert counted.get((canary, "200"), 0) > 0, counted
    # No 5xx for any revision (a 499: the bench stopped with requests in flight).
    assert {code for _, code in counted} <= {"200", "499"}, counted
    deployment = api.get("apps/v1", "deployments", ns, f"chat-{canary}")
    assert "smollm2-b" in json.dumps(deployment["spec"]["template"]["spec"])

    rollout = rollout_of(api, ns)
    assert rollout["stableRevision"] == canary
    # (a WaitingForReplicas entry after the promote, or not: that depends on how fast the pods are)
    assert [h["reason"] for h in rollout["history"] if h["reason"] != "WaitingForReplicas"] == [
        "FirstRevision", "RolloutStarted", "StepReached", "AwaitingPromote", "StepReached", "Promoted",
    ]  # fmt: skip
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=60)
    history = kvpilot_rollout(cluster, "history", "chat", "-n", ns)
    assert history.returncode == 0 and "Promoted" in history.stdout.splitlines()[-1]
    assert ("Normal", "StepReached") in events(api, ns) and ("Normal", "Promoted") in events(api, ns)


def test_a_revision_that_does_not_load_is_rolled_back_with_no_failed_request(
    cluster, api, ns, operator, model_dir, tmp_path
):
    rollout = {"strategy": "Canary", "steps": [{"weight": 50, "pause": "1m"}], "progressDeadline": "15s"}
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=1, router=ROUTER, rollout=rollout))
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=180)
    stable = rollout_of(api, ns)["stableRevision"]
    (pid,) = engine_pids(api, ns)
    url = router_url(api, ns)

    with BenchTraffic(url, model_dir / "smollm2", tmp_path) as traffic:
        api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"model": {"uri": "pvc://models/missing"}}})
        rolled_back = wait_for(
            lambda: rollout_of(api, ns).get("phase") == "RolledBack" and rollout_of(api, ns),
            "the rollback",
            timeout=180,
        )
        failed = rolled_back["revision"]
        wait_for(lambda: revision_deployments(api, ns) == {stable: 1, failed: 0}, "the canary scaled to 0")

    assert traffic.failed == [] and traffic.completed > 0, traffic.failed
    # Every request went to the stable revision, none answered with a 5xx.
    assert {revision for revision, _ in router_requests(url)} == {stable}
    assert {code for _, code in router_requests(url)} <= {"200", "499"}
    assert rolled_back["reason"] == "ProgressDeadlineExceeded"
    assert "made no progress for 15s (0 ready)" in rolled_back["message"]
    assert rolled_back["stableRevision"] == stable and rolled_back["canaryWeight"] == 0
    stalled = isvc_condition(api, ns, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "RolloutAborted")
    assert isvc_condition(api, ns, "Ready")["status"] == "True"  # the stable revision serves on
    phases = {r["hash"]: r["phase"] for r in api.get(API_VERSION, ISVC, ns, "chat")["status"]["revisions"]}
    assert phases == {stable: "Active", failed: "Failed"}
    assert ("Warning", "ProgressDeadlineExceeded") in events(api, ns)
    # The stable engine never restarted.
    assert pid_alive(pid) and engine_pids(api, ns) == [pid]

    # Back to the good spec: the stable revision, no rollout, no Stalled.
    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"model": {"uri": "pvc://models/smollm2"}}})
    wait_for(lambda: isvc_condition(api, ns, "Stalled").get("status") == "False", "Stalled=False", timeout=60)
    assert rollout_of(api, ns)["reason"] == "BackToStable"
    wait_for(lambda: revision_deployments(api, ns) == {stable: 1}, "the failed revision deleted", timeout=60)


def test_a_canary_failing_on_the_routers_error_rate_is_rolled_back_by_analysis(
    cluster, api, ns, operator, model_dir, tmp_path
):
    """The canary's server fails every other request (a test aid); the router passes the 500s on
    and counts them for the canary's revision: two failed checks in a row roll it back, with the
    measured numbers in the status."""
    analysis = {"interval": "5s", "maxErrorRate": 0.2, "minRequests": 2, "failureLimit": 2}
    rollout = {"strategy": "Canary", "steps": [{"weight": 50, "pause": "10m"}], "analysis": analysis}
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=1, router=ROUTER, rollout=rollout))
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=180)
    stable = rollout_of(api, ns)["stableRevision"]
    url = router_url(api, ns)

    with BenchTraffic(url, model_dir / "smollm2", tmp_path) as traffic:
        failing = {"extraArgs": ["--inject-error-rate", "0.5"]}  # every other request: 500
        api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"engine": failing}})
        rolled_back = wait_for(
            lambda: rollout_of(api, ns).get("phase") == "RolledBack" and rollout_of(api, ns),
            "the rollback by analysis",
            timeout=240,
            interval=1,
        )
        traffic.cut_short()
    canary = rolled_back["revision"]
    assert canary != stable and rolled_back["stableRevision"] == stable
    assert rolled_back["reason"] == "AnalysisFailed"
    assert "2 failed analysis checks in a row" in rolled_back["message"]
    assert "> maxErrorRate 0.2" in rolled_back["message"]
    last = rolled_back["lastAnalysis"]
    assert last["passed"] is False and last["requests"] >= 2 and last["errorRate"] > 0.2
    assert last["ttftP95"] > 0  # the router's time to first byte of the canary's answers
    counted = router_requests(url)
    assert counted.get((canary, "500"), 0) > 0 and counted.get((stable, "500"), 0) == 0, counted
    # The router passed the canary's 500s on (no other canary pod to retry on): the only failures
    # the clients saw are the injected ones.
    assert all("injected error" in run["output"] for run in traffic.failed), traffic.failed
    assert isvc_condition(api, ns, "Stalled")["reason"] == "RolloutAborted"
    assert isvc_condition(api, ns, "Ready")["status"] == "True"
    assert ("Warning", "AnalysisFailed") in events(api, ns)
    wait_for(lambda: revision_deployments(api, ns) == {stable: 1, canary: 0}, "the canary scaled to 0")


def test_no_gpu_for_a_surge_pod_switches_to_in_place_and_never_drops_to_zero_ready(
    cluster, api, ns, operator
):
    """Two replicas fill the cluster's two GPUs: the new revision's surge pod stays Unschedulable,
    so after capacityTimeout the operator replaces pods one by one, keeping one ready."""
    rollout = {"capacity": "Auto", "capacityTimeout": "5s"}
    resources = {"memory": "1Gi", "gpu": {"count": 1}}
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=2, resources=resources, rollout=rollout))
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=240)

    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})
    fewest_ready = 2

    def promoted_watching_ready() -> bool:
        nonlocal fewest_ready
        ready = sum(
            (d.get("status") or {}).get("readyReplicas") or 0 for d in api.list("apps/v1", "deployments", ns)
        )
        fewest_ready = min(fewest_ready, ready)
        return (
            rollout_of(api, ns).get("phase") == "Promoted"
            and rollout_of(api, ns).get("history", [{}])[-1].get("reason") == "Promoted"
        )

    wait_for(promoted_watching_ready, "the in-place rollout", timeout=300, interval=0.5)
    rollout = rollout_of(api, ns)
    switched = [h for h in rollout["history"] if h["reason"] == "CapacityInPlace"]
    assert switched and "Insufficient nvidia.com/gpu" in switched[0]["message"]
    assert fewest_ready >= 1
    wait_for(
        lambda: list(revision_deployments(api, ns).values()) == [2], "the old revision deleted", timeout=60
    )
