"""`kvpilot rollout status|history|promote|abort` through the kubernetes client and a kubeconfig
(the API emulator's): what it prints and the annotations it leaves for the operator."""

import pytest
from kvpilot.operator.rollout.state import ABORT_ANNOTATION, PROMOTE_ANNOTATION, Commands
from kvpilot.serving.cli import main

ISVC = ("kvpilot.dev/v1alpha1", "inferenceservices")
ROLLOUT = {
    "phase": "Paused",
    "revision": "b0b0b0b0b0",
    "stableRevision": "a0a0a0a0a0",
    "strategy": "Canary",
    "reason": "AwaitingPromote",
    "message": "step 2/3 (50%): waiting for `kvpilot rollout promote`",
    "step": 1,
    "canaryWeight": 50,
    "capacityMode": "InPlace",
    "capacityReason": "a pod of b0b0b0b0b0 was Unschedulable for 130s",
    "startedAt": "2026-12-01T12:00:00Z",
    "lastAnalysis": {"time": "2026-12-01T12:05:00Z", "requests": 120, "passed": True, "message": "passed"},
    "history": [
        {"time": "2026-12-01T12:00:00Z", "phase": "Progressing", "revision": "b0b0b0b0b0",
         "reason": "RolloutStarted", "message": "from a0a0a0a0a0 to b0b0b0b0b0 (Canary)"},
    ],
}  # fmt: skip
REVISIONS = [
    {"name": "chat-b0b0b0b0b0", "hash": "b0b0b0b0b0", "model": "smollm2", "quantization": "int8",
     "image": "kvpilot:0.2", "replicas": 2, "readyReplicas": 2, "weight": 50,
     "createdAt": "2026-12-01T12:00:00Z", "phase": "Canary"},
]  # fmt: skip


@pytest.fixture
def stored(kubectl, request):
    namespace = request.node.name.replace("_", "-")[:40].strip("-")
    body = {
        "apiVersion": ISVC[0],
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": namespace},
    }
    body["spec"] = {"model": {"name": "smollm2", "uri": "pvc://models/smollm2"}}
    kubectl.create(*ISVC, namespace, body)
    kubectl.patch(
        *ISVC, namespace, "chat", {"status": {"rollout": ROLLOUT, "revisions": REVISIONS}}, sub="status"
    )
    return namespace


def annotations(kubectl, namespace):
    return kubectl.get(*ISVC, namespace, "chat")["metadata"].get("annotations") or {}


def test_status_prints_phase_weights_analysis_and_revisions(stored, capsys):
    assert main(["rollout", "status", "chat", "-n", stored]) == 0
    out = capsys.readouterr().out
    assert "Phase:      Paused (AwaitingPromote): step 2/3 (50%)" in out
    assert "Revision:   b0b0b0b0b0 (weight 50%, step 2)" in out
    assert "Capacity:   InPlace (a pod of b0b0b0b0b0 was Unschedulable for 130s)" in out
    assert "Analysis:   2026-12-01T12:05:00Z passed: passed" in out
    assert "chat-b0b0b0b0b0  b0b0b0b0b0  Canary  50%     2/2" in out


def test_history_lists_the_transitions(stored, capsys):
    assert main(["rollout", "history", "chat", "-n", stored]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "PHASE", "REVISION", "REASON", "MESSAGE"]
    assert lines[1].split()[:4] == ["2026-12-01T12:00:00Z", "Progressing", "b0b0b0b0b0", "RolloutStarted"]


def test_promote_and_abort_leave_annotations_naming_revision_step_and_rollout(stored, kubectl, capsys):
    assert main(["rollout", "promote", "chat", "-n", stored]) == 0
    assert annotations(kubectl, stored)[PROMOTE_ANNOTATION] == "b0b0b0b0b0/1@2026-12-01T12:00:00Z"
    assert "past step 2" in capsys.readouterr().out
    assert main(["rollout", "promote", "chat", "-n", stored, "--full"]) == 0
    assert annotations(kubectl, stored)[PROMOTE_ANNOTATION] == "b0b0b0b0b0/full@2026-12-01T12:00:00Z"
    assert main(["rollout", "abort", "chat", "-n", stored]) == 0
    assert annotations(kubectl, stored)[ABORT_ANNOTATION] == "b0b0b0b0b0@2026-12-01T12:00:00Z"
    # What the operator reads back: the commands for this rollout, none for a later one.
    commands = Commands.from_annotations(annotations(kubectl, stored))
    assert commands.for_rollout(ROLLOUT["startedAt"]) == Commands("b0b0b0b0b0/full", "b0b0b0b0b0")
    assert commands.for_rollout("2026-12-01T13:00:00Z") == Commands()


def test_errors_name_the_object_and_the_state(stored, kubectl, capsys):
    assert main(["rollout", "status", "nope", "-n", stored]) == 1
    assert f"error: InferenceService {stored}/nope not found" in capsys.readouterr().err
    kubectl.patch(
        *ISVC, stored, "chat", {"status": {"rollout": {**ROLLOUT, "phase": "Promoted"}}}, sub="status"
    )
    assert main(["rollout", "promote", "chat", "-n", stored]) == 1
    assert "nothing to promote: the rollout of chat is Promoted" in capsys.readouterr().err
    assert PROMOTE_ANNOTATION not in annotations(kubectl, stored)
