"""The pure planner, case by case: desired vs observed -> create / update / delete."""

import copy
from typing import Any

import pytest
from kvpilot.operator.builders import build_children
from kvpilot.operator.labels import SPEC_HASH_ANNOTATION
from kvpilot.operator.planner import drifted_fields, plan, replicas_handoff
from kvpilot.operator.revision import revision_hash
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
ENGINE = f"chat-{revision_hash(isvc().spec)}"  # the revision's Deployment
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
        ([], [("Deployment", ENGINE)], []),
    ),
    (
        "container image edited: update",
        DESIRED,
        edit(OBSERVED, "Deployment", _set_image),
        ([], [("Deployment", ENGINE)], []),
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
        ([], [("Deployment", ENGINE)], [("PodDisruptionBudget", "chat")]),
    ),
    (
        "scaled to 3: Deployment updated",
        build_children(isvc(replicas=3)),
        OBSERVED,
        ([], [("Deployment", ENGINE)], []),
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
        build_children(isvc(), revision_list=[RevisionEndpoints("stable", 100, ("http://10.0.0.5:8000",))]),
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


def _owning_replicas(obj: dict[str, Any], manager: str, operation: str = "Apply") -> dict[str, Any]:
    fields = {"f:spec": {"f:replicas": {}, "f:template": {}}}
    obj["metadata"]["managedFields"] = [{"manager": manager, "operation": operation, "fieldsV1": fields}]
    return obj


@pytest.mark.parametrize(
    ("case", "spec", "owner", "operation", "expected"),
    [
        ("autoscaling turned on: hand the count over", {"autoscaling": {"maxReplicas": 4, "target": 1}},
         "kvpilot-operator", "Apply", 2),
        ("already handed over", {"autoscaling": {"maxReplicas": 4, "target": 1}},
         "kvpilot-autoscaler", "Apply", None),
        ("an HPA's update owns it", {"autoscaling": {"maxReplicas": 4, "target": 1, "engine": "hpa"}},
         "kube-controller-manager", "Update", None),
        ("no autoscaling: the operator keeps setting it", {}, "kvpilot-operator", "Apply", None),
    ],
)  # fmt: skip
def test_replicas_handoff(case, spec, owner, operation, expected):
    before = build_children(isvc(replicas=2))
    observed = [_owning_replicas(obj, owner, operation) if obj["kind"] == "Deployment" else obj
                for obj in as_observed(before)]  # fmt: skip
    deployment = next(obj["metadata"]["name"] for obj in observed if obj["kind"] == "Deployment")
    handoff = replicas_handoff(build_children(isvc(replicas=2, **spec)), observed, "kvpilot-operator")
    assert handoff == ({} if expected is None else {deployment: expected}), case
