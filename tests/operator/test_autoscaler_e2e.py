"""End to end: replicas and autoscaling, the real operator process on a real control plane.

`kubectl scale isvc` through /scale, an HPA's count surviving reconciles and revisions, and the
operator's own autoscaler following real engine load up, down, to zero and back (tests/cluster;
the fixtures are the operator suite's, test_operator_e2e.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from kvpilot.operator.api import API_VERSION

from tests.cluster.harness import OperatorProcess, condition, wait_for
from tests.operator import test_operator_e2e as e2e
from tests.operator.test_operator_e2e import ISVC, engine_deployment, isvc_condition, manifest, router_url

# The e2e suite's fixtures: namespace with the model volume, the operator process.
model_dir, kubectl, api, ns, operator = e2e.model_dir, e2e.kubectl, e2e.api, e2e.ns, e2e.operator

pytestmark = pytest.mark.timeout(420)


def test_scale_subresource_drives_the_deployment(api, ns, kubectl, operator):
    """`kubectl scale isvc` (what an HPA or KEDA does) writes spec.replicas through /scale; the
    operator follows, and /scale reads back the observed replicas and the pods' selector."""
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=0))
    wait_for(lambda: engine_deployment(api, ns), "the Deployment")
    kubectl.run("scale", "isvc", "chat", "-n", ns, "--replicas=1")
    wait_for(lambda: engine_deployment(api, ns)["spec"]["replicas"] == 1, "scale up")
    scale = wait_for(
        lambda: (
            (api.get(API_VERSION, ISVC, ns, "chat", sub="scale") or {}).get("status", {}).get("replicas") == 1
            and api.get(API_VERSION, ISVC, ns, "chat", sub="scale")
        ),
        "/scale to report one replica",
        timeout=60,
    )
    assert scale["spec"]["replicas"] == 1
    assert scale["status"]["selector"] == "app.kubernetes.io/name=kvpilot,app.kubernetes.io/instance=chat"
    selected = api.list("v1", "pods", ns, labelSelector=scale["status"]["selector"])
    assert len(selected) == 1

    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"replicas": 0}}, sub="scale")
    wait_for(lambda: engine_deployment(api, ns)["spec"]["replicas"] == 0, "scale down")
    wait_for(lambda: not api.list("v1", "pods", ns), "the engine pod to be gone", timeout=90)


def test_with_autoscaling_each_deployments_replicas_have_one_owner(api, ns, kubectl, operator):
    """Turning autoscaling on keeps the running count (the operator hands spec.replicas to the
    autoscaler's field manager before it stops applying it, which would reset it to 1); what an HPA
    does (scale the serving revision's Deployment) survives reconciles; a spec change (a new
    revision) rolls out with that count and hands the new Deployment's replicas back after."""
    api.create(API_VERSION, ISVC, ns, manifest(ns, replicas=1))
    wait_for(lambda: _deployment_replicas(api, ns) == 1, "the Deployment with 1 replica")
    autoscaling = {"minReplicas": 1, "maxReplicas": 3, "target": 0.7, "engine": "hpa"}
    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"autoscaling": autoscaling}})
    hpa = wait_for(lambda: api.get("autoscaling/v2", "horizontalpodautoscalers", ns, "chat"), "the HPA")
    deployment = engine_deployment(api, ns)
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    wait_for(lambda: _replicas_managers(api, ns) == {"kvpilot-autoscaler"}, "the replicas handed over")
    assert _deployment_replicas(api, ns) == 1

    kubectl.run("scale", "deployment", deployment["metadata"]["name"], "-n", ns, "--replicas=2")
    wait_for(
        lambda: api.get(API_VERSION, ISVC, ns, "chat")["status"]["rollout"].get("replicas") == 2,
        "the operator to take the autoscaler's count",
    )
    api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"podAnnotations": {"touched": "yes"}}})
    wait_for(
        lambda: (engine_deployment(api, ns) or {})["spec"]["template"]["metadata"]["annotations"].get(
            "touched"
        ),
        "the new revision to be promoted",
        timeout=300,
    )
    time.sleep(2)
    assert _deployment_replicas(api, ns) == 2
    new = engine_deployment(api, ns)["metadata"]["name"]
    assert new != deployment["metadata"]["name"]
    wait_for(lambda: _replicas_managers(api, ns) == {"kvpilot-autoscaler"}, "the replicas handed back")
    hpa = wait_for(lambda: api.get("autoscaling/v2", "horizontalpodautoscalers", ns, "chat"), "the HPA")
    assert hpa["spec"]["scaleTargetRef"]["name"] == new


# Short windows so the whole cycle fits in about a minute; target 1 request per replica.
AUTOSCALING = {
    "minReplicas": 1,
    "maxReplicas": 2,
    "metric": "concurrency",
    "target": 1,
    "stableWindow": "10s",
    "panicWindow": "4s",
    "scaleDownDelay": "6s",
}


def _autoscaling_status(api, ns: str) -> dict[str, Any]:
    return ((api.get(API_VERSION, ISVC, ns, "chat") or {}).get("status") or {}).get("autoscaling") or {}


def _deployment_replicas(api, ns: str) -> int | None:
    """The serving revision's Deployment's replicas."""
    return ((engine_deployment(api, ns) or {}).get("spec") or {}).get("replicas")


def _replicas_managers(api, ns: str) -> set[str]:
    """The field managers of the serving revision's Deployment's spec.replicas."""
    fields = (engine_deployment(api, ns) or {"metadata": {}})["metadata"].get("managedFields") or []
    return {e["manager"] for e in fields if "f:replicas" in (e.get("fieldsV1") or {}).get("f:spec", {})}


def _rescale_events(api, ns: str) -> list[str]:
    """The autoscaler's SuccessfulRescale Events as `FROM->TO (MODE)`, sorted."""
    events = [e for e in api.list("v1", "events", ns) if e.get("reason") == "SuccessfulRescale"]
    changes = (e["message"].split(":")[0].removeprefix("scaled from ") for e in events)
    return sorted(change.replace(" to ", "->") for change in changes)


def _history_changes(api, ns: str) -> list[str]:
    """status.autoscaling.history as `FROM->TO (MODE)`, sorted."""
    return sorted(f"{h['from']}->{h['to']} ({h['mode']})" for h in _autoscaling_status(api, ns)["history"])


def _load(base_url: str, tokenizer: Path, concurrency: int) -> subprocess.Popen:
    """`kvpilot bench serve` with `concurrency` long streams in flight until it is stopped."""
    command = [
        sys.executable, "-m", "kvpilot.serving.cli", "bench", "serve", "--base-url", base_url,
        "--tokenizer", str(tokenizer), "--num-prompts", "400", "--max-concurrency", str(concurrency),
        "--input-len", "16", "--output-len", "512",
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_the_autoscaler_follows_real_engine_load_up_down_and_to_zero(
    cluster, api, ns, kubectl, model_dir, tmp_path
):
    """The operator's own autoscaler scrapes the real engine pods' /metrics: 4 streams in flight
    through the router at a target of 1 per replica scale 1 -> 2 (panic, clamped at the max); when
    the load stops it comes back to 1; with minReplicas 0 it goes to zero, and a request sent to
    the router at zero is held, scales the engine 0 -> 1 and is answered. Each decision is in
    status.autoscaling and an Event, and replaying the recorded samples through `kvpilot autoscale
    replay` makes the same decisions."""
    samples_dir = tmp_path / "samples"
    router = {"enabled": True, "replicas": 1}
    with OperatorProcess(cluster.control_plane, "--record-samples", str(samples_dir)):
        api.create(API_VERSION, ISVC, ns, manifest(ns, autoscaling=AUTOSCALING, router=router))
        wait_for(lambda: isvc_condition(api, ns, "Ready").get("status") == "True", "Ready=True", timeout=180)
        # ScalingActive once the engine pod is Ready and its /metrics answers (False while it loads).
        wait_for(
            lambda: (
                condition({"status": _autoscaling_status(api, ns)}, "ScalingActive").get("status") == "True"
            ),
            "ScalingActive=True",
        )
        assert _autoscaling_status(api, ns)["desiredReplicas"] == 1

        url = router_url(api, ns)
        load = _load(url, model_dir / "smollm2", concurrency=4)
        try:
            wait_for(lambda: _deployment_replicas(api, ns) == 2, "a scale-up under load", timeout=120)
            wait_for(  # a real pod: scheduled, started, loaded, Ready
                lambda: api.get(API_VERSION, ISVC, ns, "chat")["status"].get("readyReplicas") == 2,
                "2 ready replicas",
                timeout=120,
            )
            wait_for(  # 4 in flight want 4 replicas: held at the max
                lambda: (
                    condition({"status": _autoscaling_status(api, ns)}, "ScalingLimited").get("reason")
                    == "TooManyReplicas"
                ),
                "ScalingLimited=TooManyReplicas",
            )
        finally:
            load.terminate()
            load.wait(timeout=30)
        up = _autoscaling_status(api, ns)["history"]
        assert (up[0]["from"], up[0]["to"], up[0]["mode"]) == (1, 2, "panic")
        assert "panic: concurrency" in up[0]["reason"]
        wait_for(lambda: _deployment_replicas(api, ns) == 1, "the scale-down after the load", timeout=90)
        # The autoscaler writes the Deployment, then the Event, then its status: wait for the last.
        wait_for(lambda: _autoscaling_status(api, ns)["history"][-1]["to"] == 1, "the scale-down in status")
        status = _autoscaling_status(api, ns)
        assert status["history"][-1]["to"] == 1 and status["history"][-1]["mode"] == "stable"
        assert (status["desiredReplicas"], status["mode"]) == (1, "stable")
        wait_for(  # the reconciler follows the Deployment's count (kubectl get isvc: Desired)
            lambda: api.get(API_VERSION, ISVC, ns, "chat")["status"].get("desiredReplicas") == 1, "Desired 1"
        )
        assert _replicas_managers(api, ns) == {"kvpilot-autoscaler"}

        # Idle with minReplicas 0: to zero; a request at zero is held by the router and answered.
        to_zero = {**AUTOSCALING, "minReplicas": 0, "scaleToZeroAfter": "4s"}
        api.patch(API_VERSION, ISVC, ns, "chat", {"spec": {"autoscaling": to_zero}})
        wait_for(lambda: _deployment_replicas(api, ns) == 0, "scale to zero", timeout=60)
        engine = "app.kubernetes.io/name=kvpilot"
        wait_for(lambda: not api.list("v1", "pods", ns, labelSelector=engine), "no engine pod", timeout=90)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=240, max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                client.chat.completions.create,
                model="smollm2",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=8,
                temperature=0,
            )
            wait_for(lambda: _deployment_replicas(api, ns) == 1, "the scale from zero", timeout=60)
            completion = answer.result(timeout=240)
        assert completion.choices[0].message.content.strip() and completion.usage.completion_tokens > 0
        history = _autoscaling_status(api, ns)["history"]
        assert (history[-2]["to"], history[-1]["from"], history[-1]["to"]) == (0, 0, 1)
        assert "requests queued at the router at zero replicas" in history[-1]["reason"]
        # One Event per decision in status. Idle again 4 s after the answer, the autoscaler may
        # scale 1 -> 0 meanwhile; it writes the Event before status: wait for the two to agree.
        wait_for(lambda: _rescale_events(api, ns) == _history_changes(api, ns), "an Event per decision")

    # The recording (up to the policy change) replays to the same decisions.
    (recording,) = samples_dir.glob(f"{ns}_chat.jsonl")
    manifest_file = tmp_path / "isvc.yaml"
    manifest_file.write_text(yaml.safe_dump(manifest(ns, autoscaling=AUTOSCALING)))
    replayed = subprocess.run(
        [sys.executable, "-m", "kvpilot.serving.cli", "autoscale", "replay", "-f", str(manifest_file),
         "--metrics", str(recording), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    changes = [json.loads(line) for line in replayed.stdout.splitlines()][:-1]
    assert [(c["from"], c["to"], c["mode"]) for c in changes[: len(status["history"])]] == [
        (h["from"], h["to"], h["mode"]) for h in status["history"]
    ]
    if os.environ.get("KVPILOT_AUTOSCALER_TIMELINE"):  # keep the recording (the README's plot)
        shutil.copy(recording, os.environ["KVPILOT_AUTOSCALER_TIMELINE"])
