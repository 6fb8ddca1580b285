"""The generated CRD: up to date, documented, accepts the examples, rejects bad manifests.

Every bad manifest must be rejected twice: by the CRD at admission (schema + CEL, see
admission.py) and by the operator's pydantic models (objects stored before a rule existed).
"""

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvpilot.operator.api import TENSOR_PARALLEL_UNSUPPORTED, InferenceService
from kvpilot.operator.crd import CRD_PATH, build_crd, render_crd
from kvpilot.operator.reconciler import describe_validation_error
from pydantic import ValidationError

from tests.operator.admission import admit, crd_schema

TENANT = {"name": "team-a", "apiKeySecretRef": {"name": "keys", "key": "team-a"}}
EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
ISSUE_MANIFEST = """
apiVersion: kvpilot.dev/v1alpha1
kind: InferenceService
metadata: {name: chat, namespace: team-a}
spec:
  model: {name: smollm2, uri: "pvc://models/smollm2"}
  engine: {quantization: int4, kvCacheDtype: int8, maxModelLen: 4096}
  resources: {gpu: {count: 1}, memory: 16Gi}
  replicas: 2
"""


def test_committed_crd_is_generated_from_the_models():
    assert CRD_PATH.read_text() == render_crd(), (
        "crds/ is stale: run `kvpilot crd -o crds/inferenceservice.yaml`"
    )


def _walk(schema: dict[str, Any], path: str):
    yield path, schema
    for name, prop in (schema.get("properties") or {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_metadata_schema_holds_only_name_and_generate_name():
    # kube-apiserver: "must not specify anything other than name and generateName, but metadata is
    # implicitly specified" for any other key on `metadata` (a description included);
    # test_crd_apiserver.py applies the CRD to a real kube-apiserver as well.
    metadata = crd_schema()["properties"]["metadata"]
    assert set(metadata) <= {"type", "properties"}
    assert metadata["type"] == "object"
    assert set(metadata.get("properties", {})) <= {"name", "generateName"}


def test_every_field_is_described_and_structural():
    for path, node in _walk(crd_schema(), ""):
        if path == ".metadata":  # may carry nothing but `type` and `properties` (test above)
            continue
        assert node.get("description"), f"{path} has no description"
        assert "$ref" not in node and "title" not in node, path
        assert node.get("type") or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_crd_subresources_and_printer_columns():
    version = build_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert version["subresources"]["status"] == {}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready",
        "Model",
        "Desired",
        "Current",
        "Mode",
        "Rollout",
        "Canary",
        "URL",
        "Age",
    ]
    assert build_crd()["spec"]["names"]["shortNames"] == ["isvc"]


def test_the_issue_manifest_is_accepted_exactly_and_defaulted():
    manifest = yaml.safe_load(ISSUE_MANIFEST)
    defaulted, errors = admit(manifest)
    assert errors == []
    spec = defaulted["spec"]
    assert spec["engine"]["tensorParallelSize"] == 1
    assert spec["engine"]["enablePrefixCaching"] is True
    assert spec["resources"]["gpu"] == {"count": 1, "resourceName": "nvidia.com/gpu"}
    assert spec["resources"]["sharedMemory"] == "2Gi"
    assert spec["rollout"] == {
        "strategy": "Rolling",
        "autoRollback": True,
        "capacity": "Auto",
        "capacityTimeout": "2m",
        "progressDeadline": "15m",
        "paused": False,
    }
    assert "autoscaling" not in spec
    # The operator's parse of the undefaulted manifest agrees with the API server's defaults.
    parsed = InferenceService.from_body(manifest).spec.model_dump(by_alias=True, exclude_none=True)
    assert _without_empty(parsed) == _without_empty(spec)


def _without_empty(value: Any) -> Any:
    if isinstance(value, dict):
        pruned = {k: _without_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, [])}
    return value


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted(path):
    for manifest in yaml.safe_load_all(path.read_text()):
        assert admit(manifest)[1] == []
        InferenceService.from_body(manifest)


def _with(change: dict[str, Any]) -> dict[str, Any]:
    manifest = yaml.safe_load(ISSUE_MANIFEST)
    for dotted, value in change.items():
        *parents, leaf = dotted.split(".")
        node = manifest
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)
    return manifest


BAD = [
    ("unknown quantization", {"spec.engine.quantization": "int3"}, "spec.engine.quantization"),
    ("unknown kv cache dtype", {"spec.engine.kvCacheDtype": "fp16"}, "spec.engine.kvCacheDtype"),
    ("unsupported URI scheme", {"spec.model.uri": "ftp://host/model"}, "spec.model.uri"),
    ("claim name not a DNS name", {"spec.model.uri": "pvc://Models/x"}, "spec.model.uri"),
    ("hf URI without a repo", {"spec.model.uri": "hf://just-org"}, "spec.model.uri"),
    ("no model", {"spec.model": None}, "model"),
    ("tiny maxModelLen", {"spec.engine.maxModelLen": 8}, "spec.engine.maxModelLen"),
    ("negative replicas", {"spec.replicas": -1}, "spec.replicas"),
    ("memory not a quantity", {"spec.resources.memory": "16 GB"}, "spec.resources.memory"),
    ("too many GPUs", {"spec.resources.gpu": {"count": 100}}, "spec.resources.gpu.count"),
    ("unknown rollout strategy", {"spec.rollout": {"strategy": "Shadow"}}, "spec.rollout.strategy"),
    ("canary without steps", {"spec.rollout": {"strategy": "Canary"}}, "spec.rollout.steps"),
    (
        "steps with Rolling",
        {"spec.rollout": {"strategy": "Rolling", "steps": [{"weight": 10}]}},
        "spec.rollout.steps",
    ),
    (
        "analysis with Rolling",
        {"spec.rollout": {"analysis": {"maxErrorRate": 0.1}}},
        "spec.rollout.analysis",
    ),
    (
        "step weight over 100",
        {"spec.rollout": {"strategy": "Canary", "steps": [{"weight": 101}]}},
        "spec.rollout.steps.0.weight",
    ),
    (
        "pause not a duration",
        {"spec.rollout": {"strategy": "Canary", "steps": [{"weight": 10, "pause": "5 minutes"}]}},
        "spec.rollout.steps.0.pause",
    ),
    ("capacityTimeout not a duration", {"spec.rollout": {"capacityTimeout": "2"}}, "capacityTimeout"),
    ("unknown capacity", {"spec.rollout": {"capacity": "Borrow"}}, "spec.rollout.capacity"),
    ("rollbackTo not a revision", {"spec.rollout": {"rollbackTo": "Chat-1"}}, "spec.rollout.rollbackTo"),
    (
        "bad toleration operator",
        {"spec.scheduling": {"tolerations": [{"key": "k", "operator": "Maybe"}]}},
        "spec.scheduling.tolerations.0.operator",
    ),
    # Cross-field rules: CEL in the CRD, model validators in pydantic.
    (
        "tensor parallelism (not supported yet)",
        {"spec.engine.tensorParallelSize": 2, "spec.resources.gpu": {"count": 2}},
        "spec.engine.tensorParallelSize",
    ),
    (
        "autoscaling min above max",
        {"spec.replicas": None, "spec.autoscaling": {"minReplicas": 3, "maxReplicas": 2, "target": 1}},
        "spec.autoscaling.minReplicas",
    ),
    *[
        (name, {"spec.replicas": None, "spec.autoscaling": {"maxReplicas": 4, "target": 1, **fields}}, field)
        for name, fields, field in [
            ("panic window above the stable window", {"panicWindow": "2m"}, "spec.autoscaling.panicWindow"),
            ("a panic window of nothing", {"panicWindow": "0s"}, "spec.autoscaling.panicWindow"),
            (
                "an HPA cannot scale to zero",
                {"engine": "hpa", "minReplicas": 0},
                "spec.autoscaling.minReplicas",
            ),
            ("keda without prometheus", {"engine": "keda"}, "spec.autoscaling.prometheus"),
            ("duration not Go's", {"scaleDownDelay": "5 minutes"}, "spec.autoscaling.scaleDownDelay"),
            ("tolerance of 1", {"tolerance": 1}, "spec.autoscaling.tolerance"),
            ("panic threshold of 1", {"panicThreshold": 1}, "spec.autoscaling.panicThreshold"),
            ("unknown autoscaler", {"engine": "vpa"}, "spec.autoscaling.engine"),
            ("unknown metric", {"metric": "cpu"}, "spec.autoscaling.metric"),
        ]
    ],
    ("revision on a PVC", {"spec.model.revision": "main"}, "spec.model.revision"),
    (
        "revision twice",
        {"spec.model.uri": "hf://org/repo@v1", "spec.model.revision": "v2"},
        "spec.model.revision",
    ),
    (
        "selector label in podLabels",
        {"spec.podLabels": {"app.kubernetes.io/instance": "x"}},
        "spec.podLabels",
    ),
    ("name not a DNS label", {"metadata.name": "Chat_1"}, "metadata.name"),
    ("cache of a PVC model", {"spec.model.cache": {"size": "10Gi"}}, "spec.model.cache"),
    (
        "architecture both known and given",
        {"spec.model.architecture": {"known": "Llama-3-8B", "hiddenSize": 4096}},
        "spec.model.architecture.known",
    ),
    (
        "architecture incomplete",
        {"spec.model.architecture": {"hiddenSize": 4096}},
        "spec.model.architecture.known",
    ),
    (
        "unknown architecture",
        {"spec.model.architecture": {"known": "GPT-5"}},
        "spec.model.architecture.known",
    ),
    ("load timeout not a duration", {"spec.engine.loadTimeout": "30 minutes"}, "spec.engine.loadTimeout"),
    ("GPU share above 1", {"spec.engine.gpuMemoryUtilization": 1.5}, "spec.engine.gpuMemoryUtilization"),
    (
        "GPU memory not a quantity",
        {"spec.resources.gpu": {"count": 1, "memory": "80 GB"}},
        "spec.resources.gpu.memory",
    ),
    ("name too long for `<name>-engine`", {"metadata.name": "a" * 57}, "metadata.name"),
    ("no router replicas", {"spec.router": {"replicas": 0}}, "spec.router.replicas"),
    ("unknown balancing", {"spec.router": {"balancing": "round-robin"}}, "spec.router.balancing"),
    *[
        (name, {"spec.router": {"activation": activation}}, field)
        for name, activation, field in [
            ("activation timeout under 1s", {"timeout": "500ms"}, "spec.router.activation.timeout"),
            ("activation timeout not Go's", {"timeout": "5 minutes"}, "spec.router.activation.timeout"),
            ("nothing may be held", {"maxQueued": 0}, "spec.router.activation.maxQueued"),
        ]
    ],
    ("tenant without a key", {"spec.tenants": [{"name": "team-a"}]}, "spec.tenants.0.apiKeySecretRef"),
    ("tenant name not a DNS label", {"spec.tenants": [{**TENANT, "name": "Team A"}]}, "spec.tenants.0.name"),
    ("zero requests per minute", {"spec.tenants": [{**TENANT, "requestsPerMinute": 0}]}, "requestsPerMinute"),
    (
        "tenants without the router",
        {"spec.tenants": [TENANT], "spec.router": {"enabled": False}},
        "spec.tenants",
    ),
    ("the same tenant twice", {"spec.tenants": [TENANT, TENANT]}, "spec.tenants"),
    (
        "the engine's key in env beside upstreamApiKeySecretRef",
        {
            "spec.env": [{"name": "KVPILOT_API_KEY", "value": "x"}],
            "spec.router": {"upstreamApiKeySecretRef": {"name": "engine-key", "key": "key"}},
        },
        "spec.env",
    ),
    # Every quantity is a size or a CPU share (a negative or zero one reached the pods before).
    ("negative memory", {"spec.resources.memory": "-16Gi"}, "spec.resources.memory"),
    ("zero KV cache memory", {"spec.engine.kvCacheMemory": "0"}, "spec.engine.kvCacheMemory"),
    ("zero CPU as an integer", {"spec.resources.cpu": 0}, "spec.resources.cpu"),
    ("zero shared memory", {"spec.resources.sharedMemory": "0.0Gi"}, "spec.resources.sharedMemory"),
    # Label values: refused at admission, not later by the API server refusing the Deployment.
    ("pod label value too long", {"spec.podLabels": {"team": "x" * 64}}, "spec.podLabels.team"),
    (
        "node selector value not a label value",
        {"spec.scheduling": {"nodeSelector": {"pool": "gpu pool"}}},
        "spec.scheduling.nodeSelector.pool",
    ),
]


@pytest.mark.parametrize(("change", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifests_are_rejected_by_the_crd_and_the_models(change, field):
    manifest = _with(change)
    _, errors = admit(manifest)
    assert errors, "the CRD accepted it"
    with pytest.raises(ValidationError) as raised:
        InferenceService.from_body(manifest)
    message = describe_validation_error(raised.value)
    assert field.split(".")[-1] in message or field in message, message


ROLLOUT = {
    "strategy": "Canary",
    "steps": [{"weight": 10, "pause": "5m"}, {"weight": 50, "pause": "manual"}, {"weight": 100}],
    "analysis": {"interval": "1m", "maxErrorRate": 0.02, "maxTTFTSeconds": {"p95": 2.0}, "minRequests": 50},
    "capacity": "Auto",
    "progressDeadline": "10m",
}


def test_a_canary_rollout_is_accepted_and_defaulted_alike():
    manifest = _with({"spec.rollout": ROLLOUT})
    defaulted, errors = admit(manifest)
    assert errors == []
    rollout = defaulted["spec"]["rollout"]
    assert rollout["analysis"]["failureLimit"] == 2
    assert (rollout["autoRollback"], rollout["capacityTimeout"], rollout["paused"]) == (True, "2m", False)
    parsed = InferenceService.from_body(manifest).spec.rollout.model_dump(by_alias=True, exclude_none=True)
    assert parsed == rollout


def test_an_autoscaling_policy_is_defaulted_alike_by_the_crd_and_the_models():
    manifest = _with(
        {"spec.autoscaling": {"minReplicas": 0, "maxReplicas": 4, "target": 2, "panicWindow": "1m"}}
    )
    defaulted, errors = admit(manifest)
    assert errors == []
    assert defaulted["spec"]["autoscaling"] == {
        "minReplicas": 0, "maxReplicas": 4, "target": 2, "metric": "kvCacheUsage", "engine": "kvpilot",
        "scaleToZeroAfter": "5m", "stableWindow": "60s", "panicWindow": "1m", "panicThreshold": 2.0,
        "maxScaleUpRate": 2.0, "maxScaleDownRate": 2.0, "scaleDownDelay": "5m", "tolerance": 0.1,
        "initialDelay": "0s",
    }  # fmt: skip
    parsed = InferenceService.from_body(manifest).spec.autoscaling.model_dump(
        by_alias=True, exclude_none=True
    )
    assert parsed == defaulted["spec"]["autoscaling"]


@pytest.mark.parametrize("quantity", ["16Gi", "500m", "2", 2, "+1Gi", "0.5", ".5", "1e3", "10Mi", "1.5G"])
def test_positive_quantities_are_accepted_by_the_crd_and_the_models(quantity):
    manifest = _with({"spec.resources.memory": quantity, "spec.resources.cpu": quantity})
    assert admit(manifest)[1] == []
    assert InferenceService.from_body(manifest).spec.resources.memory == str(quantity)


def test_a_kv_cache_under_a_mebibyte_is_rejected_by_the_operator_naming_the_field():
    """The schema's pattern takes `500m` (half a byte); the operator's InvalidSpec names the field
    instead of the pod crash-looping on `--kv-cache-memory 0`."""
    with pytest.raises(ValidationError) as raised:
        InferenceService.from_body(_with({"spec.engine.kvCacheMemory": "500m"}))
    assert describe_validation_error(raised.value) == "spec.engine.kvCacheMemory: '500m' is less than 1Mi"


def test_a_message_that_names_its_field_is_not_prefixed_twice():
    with pytest.raises(ValidationError) as raised:
        InferenceService.from_body(_with({"spec.model.architecture": {"hiddenSize": 4096}}))
    message = describe_validation_error(raised.value)
    assert message.count("spec.model.architecture") == 1, message


def test_cel_rule_messages_name_their_fields():
    manifest = _with({"spec.engine.tensorParallelSize": 2, "spec.resources.gpu": {"count": 4}})
    assert admit(manifest)[1] == [f".spec.engine.tensorParallelSize: {TENSOR_PARALLEL_UNSUPPORTED}"]
    assert "not supported yet" in TENSOR_PARALLEL_UNSUPPORTED
    good = _with({"spec.engine.tensorParallelSize": 1, "spec.resources.gpu": {"count": 4}})
    assert admit(good)[1] == []
