"""The pure planner, case by case: desired vs observed -> create / update / delete."""

import copy
from typing import Any

import pytest
from kvpilot.operator.builders import build_children
from kvpilot.operator.labels import SPEC_HASH_ANNOTATION
from kvpilot.operator.planner import drifted_fields, parse_quantity, plan
from kvpilot.operator.router_config import RevisionEndpoints

from tests.operator.test_builders import isvc


def as_observed(desired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a server returns after creating `desired`: server-set fields and defaults added."""
    observed = copy.deepcopy(desired)
    for obj in observed:
        obj["metadata"].update(uid="u-" + obj["metadata"]["name"], resourceVersion="7", generation=1)
        obj["metadata"]["managedFields"] = [{"manager": "kvpilot-operator"}]
        if obj["kind"] == "Deployment":
            pod = obj["spec"]["template"]["spec"]
            pod["dnsPolicy"] = "ClusterFirst"
            pod["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
            pod["volumes"][1]["emptyDir"]["sizeLimit"] = "2048Mi"  # canonicalised by the server
            obj["status"] = {"replicas": 2, "readyReplicas": 1}
        if obj["kind"] == "Service":
            obj["spec"]["clusterIP"] = "10.0.0.7"
            obj["spec"]["sessionAffinity"] = "None"
    return observed


def names(objs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(obj["kind"], obj["metadata"]["name"]) for obj in objs]


def edit(observed: list[dict[str, Any]], kind: str, fn) -> list[dict[str, Any]]:
    observed = copy.deepcopy(observed)
    fn(next(obj for obj in observed if obj["kind"] == kind))
    return observed


DESIRED = build_children(isvc())
OBSERVED = as_observed(DESIRED)
AUTOSCALED = build_children(isvc(autoscaling={"minReplicas": 1, "maxReplicas": 8, "target": 0.7}))


def _set_replicas(obj):
    obj["spec"]["replicas"] = 5


def _set_image(obj):
    obj["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"


def _foreign_label(obj):
    obj["metadata"]["labels"]["team"] = "a"
    obj["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"


def _drop_port(obj):
    obj["spec"]["ports"] = []


def _old_hash(obj):
    obj["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = "0000000000000000"


def _memory_in_other_units(obj):
    obj["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] = "17179869184"


CASES = [
    # name, desired, observed, (create, update, delete)
    ("nothing exists: create all", DESIRED, [], (names(DESIRED), [], [])),
    ("in sync despite server defaults: no writes", DESIRED, OBSERVED, ([], [], [])),
    (
        "owned field drifted: update",
        DESIRED,
        edit(OBSERVED, "Deployment", _set_replicas),
        ([], [("Deployment", "chat")], []),
    ),
    (
        "container image edited: update",
        DESIRED,
        edit(OBSERVED, "Deployment", _set_image),
        ([], [("Deployment", "chat")], []),
    ),
    (
        "foreign labels and annotations: left alone",
        DESIRED,
        edit(OBSERVED, "Deployment", _foreign_label),
        ([], [], []),
    ),
    (
        "service port removed: update",
        DESIRED,
        edit(OBSERVED, "Service", _drop_port),
        ([], [("Service", "chat-engine")], []),
    ),
    (
        "spec changed (hash): update",
        DESIRED,
        edit(OBSERVED, "Service", _old_hash),
        ([], [("Service", "chat-engine")], []),
    ),
    (
        "same quantity, other units: no writes",
        DESIRED,
        edit(OBSERVED, "Deployment", _memory_in_other_units),
        ([], [], []),
    ),
    (
        "scaled to 1: PDB deleted",
        build_children(isvc(replicas=1)),
        OBSERVED,
        ([], [("Deployment", "chat")], [("PodDisruptionBudget", "chat")]),
    ),
    (
        "scaled to 3: Deployment updated",
        build_children(isvc(replicas=3)),
        OBSERVED,
        ([], [("Deployment", "chat")], []),
    ),
    (
        "autoscaled: an autoscaler's replicas are not reverted",
        AUTOSCALED,
        edit(as_observed(AUTOSCALED), "Deployment", _set_replicas),
        ([], [], []),
    ),
    (
        "Services deleted by hand: recreated",
        DESIRED,
        [o for o in OBSERVED if o["kind"] != "Service"],
        ([("Service", "chat-engine"), ("Service", "chat")], [], []),
    ),
    (
        "an engine pod became ready: only the router's ConfigMap",
        build_children(isvc(), [RevisionEndpoints("stable", 100, ("http://10.0.0.5:8000",))]),
        OBSERVED,
        ([], [("ConfigMap", "chat-router")], []),
    ),
    (
        "router turned off: its children go, the engine's Service becomes `chat`",
        build_children(isvc(router={"enabled": False})),
        OBSERVED,
        (
            [],
            [("Service", "chat")],
            [
                ("Service", "chat-engine"),
                ("ConfigMap", "chat-router"),
                ("Deployment", "chat-router"),
                ("PodDisruptionBudget", "chat-router"),
            ],
        ),
    ),
    (
        "InferencePool asked for, CRD served: created",
        build_children(isvc(router={"inferencePool": True}), inference_pool_served=True),
        OBSERVED,
        ([("InferencePool", "chat")], [], []),
    ),
    (
        "InferencePool asked for, CRD not served: nothing",
        build_children(isvc(router={"inferencePool": True}), inference_pool_served=False),
        OBSERVED,
        ([], [], []),
    ),
]


@pytest.mark.parametrize(
    ("desired", "observed", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan_table(desired, observed, expected):
    result = plan(desired, observed)
    assert (names(result.create), names(result.update), names(result.delete)) == expected
    assert result.is_empty == (expected == ([], [], []))


def test_drifted_fields_names_the_paths():
    drifted = edit(OBSERVED, "Deployment", _set_image)
    deployment = next(obj for obj in drifted if obj["kind"] == "Deployment")
    assert drifted_fields(DESIRED[0], deployment) == ["spec.template.spec.containers[0].image"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16Gi", 16 * 2**30),
        ("500m", 0.5),
        ("2", 2),
        ("1.5G", 1.5e9),
        ("2048Mi", 2 * 2**30),
        ("1e3", 1000),
        ("x", None),
    ],
)
def test_parse_quantity(text, value):
    parsed = parse_quantity(text)
    assert (parsed if parsed is None else float(parsed)) == value
