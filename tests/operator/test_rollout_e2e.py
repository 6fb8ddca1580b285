"""Rollouts end to end: the real operator process on the real control plane (tests/cluster), the
engine pods as real `kvpilot serve` processes, `kvpilot rollout` as a real command with the
cluster's kubeconfig. A canary walks its steps and is promoted by the CLI; a revision whose model
does not load is rolled back while the stable revision keeps serving.

Without the router (issue 14) the weights are reported but not enforced; these tests check the
revisions, replicas, phases, conditions, Events and that the stable revision never stops.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
from kvpilot.operator.api import API_VERSION

from tests.cluster.harness import wait_for
from tests.cluster.processes import pid_alive
from tests.operator import test_operator_e2e as e2e
from tests.operator.test_operator_e2e import ISVC, engine_pids, isvc_condition, manifest

# The e2e suite's fixtures: namespace with the model volume, the operator process.
model_dir, kubectl, api, ns, operator = e2e.model_dir, e2e.kubectl, e2e.api, e2e.ns, e2e.operator

pytestmark = pytest.mark.timeout(420)


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
    }


def events(api, ns: str) -> list[tuple[str, str]]:
    return [
        (e["type"], e["reason"])
        for e in api.list("v1", "events", ns)
        if e["involvedObject"]["name"] == "chat"
    ]


def test_a_canary_walks_its_steps_and_the_cli_promotes_it(cluster, api, ns, operator):
    steps = [{"weight": 50, "pause": "manual"}, {"weight": 100, "pause": "2s"}]
    api.create(
        API_VERSION, ISVC, ns, manifest(ns, replicas=2, rollout={"strategy": "Canary", "steps": steps})
    )
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=180)
    stable = rollout_of(api, ns)["stableRevision"]

    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})
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

    shown = kvpilot_rollout(cluster, "status", "chat", "-n", ns)
    assert shown.returncode == 0, shown.stderr
    assert (
        "Paused (AwaitingPromote)" in shown.stdout
        and f"Revision:   {canary} (weight 50%, step 1)" in shown.stdout
    )

    promoted = kvpilot_rollout(cluster, "promote", "chat", "-n", ns)
    assert promoted.returncode == 0, promoted.stderr
    wait_for(lambda: rollout_of(api, ns).get("phase") == "Promoted", "the promotion", timeout=180)
    rollout = rollout_of(api, ns)
    assert rollout["stableRevision"] == canary
    # (a WaitingForReplicas entry after the promote, or not: that depends on how fast the pods are)
    assert [h["reason"] for h in rollout["history"] if h["reason"] != "WaitingForReplicas"] == [
        "FirstRevision", "RolloutStarted", "StepReached", "AwaitingPromote", "StepReached", "Promoted",
    ]  # fmt: skip
    wait_for(lambda: revision_deployments(api, ns) == {canary: 2}, "the old revision deleted", timeout=60)
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=60)
    history = kvpilot_rollout(cluster, "history", "chat", "-n", ns)
    assert history.returncode == 0 and "Promoted" in history.stdout.splitlines()[-1]
    assert ("Normal", "StepReached") in events(api, ns) and ("Normal", "Promoted") in events(api, ns)


def test_a_revision_that_does_not_load_is_rolled_back_while_the_stable_one_serves(cluster, api, ns, operator):
    rollout = {"strategy": "Canary", "steps": [{"weight": 50, "pause": "1m"}], "progressDeadline": "15s"}
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=1, rollout=rollout))
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=180)
    stable = rollout_of(api, ns)["stableRevision"]
    (pod,) = api.list("v1", "pods", ns)
    (pid,) = engine_pids(api, ns)

    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"model": {"uri": "pvc://models/missing"}}})
    rolled_back = wait_for(
        lambda: rollout_of(api, ns).get("phase") == "RolledBack" and rollout_of(api, ns),
        "the rollback",
        timeout=180,
    )
    assert rolled_back["reason"] == "ProgressDeadlineExceeded"
    assert "made no progress for 15s (0 ready)" in rolled_back["message"]
    assert rolled_back["stableRevision"] == stable and rolled_back["canaryWeight"] == 0
    failed = rolled_back["revision"]
    wait_for(lambda: revision_deployments(api, ns) == {stable: 1, failed: 0}, "the canary scaled to 0")
    stalled = isvc_condition(api, ns, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "RolloutAborted")
    assert isvc_condition(api, ns, "Ready")["status"] == "True"  # the stable revision serves on
    phases = {r["hash"]: r["phase"] for r in api.get(API_VERSION, ISVC, ns, "chat")["status"]["revisions"]}
    assert phases == {stable: "Active", failed: "Failed"}
    assert ("Warning", "ProgressDeadlineExceeded") in events(api, ns)

    # The stable engine never restarted and answers.
    assert pid_alive(pid) and engine_pids(api, ns) == [pid]
    response = httpx.post(
        f"http://{pod['status']['podIP']}:8000/v1/completions",
        json={"model": "smollm2", "prompt": "Hello", "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 200, response.text

    # Back to the good spec: the stable revision, no rollout, no Stalled.
    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"model": {"uri": "pvc://models/smollm2"}}})
    wait_for(lambda: isvc_condition(api, ns, "Stalled").get("status") == "False", "Stalled=False", timeout=60)
    assert rollout_of(api, ns)["reason"] == "BackToStable"
    wait_for(lambda: revision_deployments(api, ns) == {stable: 1}, "the failed revision deleted", timeout=60)


def test_a_canary_failing_its_analysis_is_rolled_back(cluster, api, ns, operator):
    """The engine pods' own TTFT histogram, against a limit no real engine meets: two failed checks
    in a row roll the canary back, with the measured numbers in the status."""
    analysis = {"interval": "5s", "maxTTFTSeconds": {"p95": 0.000001}, "minRequests": 2, "failureLimit": 2}
    rollout = {"strategy": "Canary", "steps": [{"weight": 50, "pause": "10m"}], "analysis": analysis}
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=1, rollout=rollout))
    wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=180)
    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"engine": {"maxNumSeqs": 8}}})
    wait_for(lambda: rollout_of(api, ns).get("canaryWeight") == 50, "the canary at 50%", timeout=180)
    canary = rollout_of(api, ns)["revision"]
    (pod,) = [
        p for p in api.list("v1", "pods", ns) if p["metadata"]["labels"]["kvpilot.dev/revision"] == canary
    ]

    def traffic_until_rolled_back() -> dict[str, Any] | None:
        for _ in range(3):
            response = httpx.post(
                f"http://{pod['status']['podIP']}:8000/v1/completions",
                json={"model": "smollm2", "prompt": "Hello", "max_tokens": 2},
                timeout=60,
            )
            assert response.status_code == 200, response.text
        rollout = rollout_of(api, ns)
        return rollout if rollout.get("phase") == "RolledBack" else None

    rolled_back = wait_for(traffic_until_rolled_back, "the rollback by analysis", timeout=120, interval=1)
    assert rolled_back["reason"] == "AnalysisFailed"
    assert "2 failed analysis checks in a row" in rolled_back["message"]
    assert "maxTTFTSeconds.p95 1e-06" in rolled_back["message"]
    last = rolled_back["lastAnalysis"]
    assert last["passed"] is False and last["requests"] >= 2 and last["ttftP95"] > 0.000001
    assert isvc_condition(api, ns, "Stalled")["reason"] == "RolloutAborted"
    assert ("Warning", "AnalysisFailed") in events(api, ns)


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
