"""The generated CRD on a real kube-apiserver (tests/cluster): accepted, defaulting, validating.

test_crd.py checks the same manifests against admission.py (the schema and CEL evaluated in
Python); here the API server itself decides, so a CRD that a real cluster rejects cannot land.
"""

import json

import kubernetes.config
import pytest
import yaml
from kvpilot.operator.api import GROUP, PLURAL, InferenceService
from kvpilot.operator.builders import build_children
from kvpilot.operator.crd import CRD_PATH, build_crd
from kvpilot.operator.executor import KubeClient
from kvpilot.operator.planner import drifted_fields, plan

from tests.cluster.harness import condition, wait_for
from tests.cluster.kubeapi import ApiError, KubeApi
from tests.cluster.kubectl import Kubectl, helm
from tests.operator.admission import admit, crd_schema
from tests.operator.test_crd import BAD, EXAMPLES, ISSUE_MANIFEST, _with
from tests.operator.test_helm import CHART

ISVC_API = "kvpilot.dev/v1alpha1"
NAMESPACES = {"team-a", "kvpilot-system"} | {
    manifest["metadata"].get("namespace", "default")
    for path in EXAMPLES
    for manifest in yaml.safe_load_all(path.read_text())
}


@pytest.fixture(scope="module")
def api(control_plane):
    client = KubeApi(control_plane.kubeconfig)
    yield client
    client.close()


@pytest.fixture(scope="module")
def kubectl(control_plane, api) -> Kubectl:
    kubectl = Kubectl(control_plane.kubeconfig)
    kubectl.apply("-f", str(CRD_PATH))
    # Polled here: `kubectl wait` fails outright on a CRD whose status has no conditions yet.
    crd = ("apiextensions.k8s.io/v1", "customresourcedefinitions", None, f"{PLURAL}.{GROUP}")
    wait_for(lambda: condition(api.get(*crd), "Established").get("status") == "True", "the CRD")
    for namespace in sorted(NAMESPACES):
        if api.get("v1", "namespaces", None, namespace) is None:
            api.create("v1", "namespaces", None, {"metadata": {"name": namespace}})
    return kubectl


def test_the_crd_is_established_with_its_schema_unchanged(kubectl, api):
    stored = api.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, f"{PLURAL}.{GROUP}")
    assert {c["type"]: c["status"] for c in stored["status"]["conditions"]}["Established"] == "True"
    # Nothing pruned or rewritten: the API server stores the schema we generate.
    assert stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"] == crd_schema()


def test_a_description_on_metadata_is_rejected_as_the_issue_reports(kubectl, api):
    crd = build_crd()
    crd["spec"]["group"] = "regression.kvpilot.dev"
    crd["metadata"]["name"] = f"{PLURAL}.regression.kvpilot.dev"
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["metadata"]["description"] = "Standard object metadata."
    with pytest.raises(ApiError) as rejected:
        api.create("apiextensions.k8s.io/v1", "customresourcedefinitions", None, crd, dryRun="All")
    assert rejected.value.status_code == 422
    assert "metadata is implicitly specified" in rejected.value.message


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_stored_with_the_defaults_admission_py_predicts(kubectl, api, path):
    kubectl.apply("-f", str(path))
    for manifest in yaml.safe_load_all(path.read_text()):
        metadata = manifest["metadata"]
        stored = api.get(ISVC_API, PLURAL, metadata.get("namespace", "default"), metadata["name"])
        assert stored["spec"] == admit(manifest)[0]["spec"]
        kubectl.run("delete", "-f", str(path))


@pytest.mark.parametrize(("change", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifests_are_rejected_at_admission(kubectl, change, field):
    result = kubectl.apply("--dry-run=server", "-f", "-", stdin=json.dumps(_with(change)), check=False)
    assert result.returncode != 0, f"the API server accepted it: {result.stdout}"
    # A list map's duplicate keys fail before validation, when kubectl's patch is typed.
    assert "is invalid" in result.stderr or "duplicate entries" in result.stderr, result.stderr
    assert field.split(".")[-1] in result.stderr, result.stderr


def _rules(schema, path=""):
    yield from schema.get("x-kubernetes-validations") or []
    for name, prop in (schema.get("properties") or {}).items():
        yield from _rules(prop, f"{path}.{name}")
    if "items" in schema:
        yield from _rules(schema["items"], f"{path}[]")


def test_every_cel_rule_rejects_a_manifest_at_admission_with_its_message(kubectl, api):
    rejected_messages = []
    for _, change, _ in BAD:
        try:
            api.create(ISVC_API, PLURAL, "team-a", _with(change), dryRun="All")
        except ApiError as error:
            rejected_messages.append(error.message)
    for rule in _rules(crd_schema()):
        assert any(rule["message"] in message for message in rejected_messages), rule


def test_an_autoscaled_isvc_gets_default_replicas_so_its_scale_subresource_works(kubectl, api):
    """Without a stored spec.replicas, GET /scale is a 500 ("the spec replicas field does not
    exist"): an HPA or KEDA pointed at the InferenceService could not read it."""
    manifest = _with(
        {"spec.replicas": None, "spec.autoscaling": {"minReplicas": 1, "maxReplicas": 4, "target": 0.5}}
    )
    manifest["metadata"]["name"] = "autoscaled"
    stored = api.create(ISVC_API, PLURAL, "team-a", manifest)
    assert stored["spec"]["replicas"] == 1  # the CRD's default
    scale = api.get(ISVC_API, PLURAL, "team-a", "autoscaled", sub="scale")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1
    api.delete(ISVC_API, PLURAL, "team-a", "autoscaled")


def test_kubectl_scale_isvc_reads_and_writes_the_scale_subresource(kubectl, api):
    manifest = yaml.safe_load(ISSUE_MANIFEST)
    manifest["metadata"]["name"] = "scaled"
    kubectl.apply("-f", "-", stdin=json.dumps(manifest))
    kubectl.run("scale", "isvc", "scaled", "-n", "team-a", "--replicas=3")
    assert api.get(ISVC_API, PLURAL, "team-a", "scaled")["spec"]["replicas"] == 3
    scale = api.get(ISVC_API, PLURAL, "team-a", "scaled", sub="scale")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    api.patch(ISVC_API, PLURAL, "team-a", "scaled", {"spec": {"replicas": 1}}, sub="scale")
    assert api.get(ISVC_API, PLURAL, "team-a", "scaled")["spec"]["replicas"] == 1
    kubectl.run("delete", "isvc", "scaled", "-n", "team-a")
    wait_for(lambda: api.get(ISVC_API, PLURAL, "team-a", "scaled") is None, "the delete")


def test_the_children_as_the_api_server_stores_them_need_no_update(kubectl, api, control_plane):
    """The planner's promise, on the server that makes it hard: after the apply, what is read back
    (quantities canonicalised, e.g. an HPA target of 1000 as 1k; empty values omitted, e.g. an env
    var's value "") matches the desired children, so re-reconciling an unchanged spec writes
    nothing. The env entry named like the operator's HF_HOME would make the apply itself fail
    (server-side apply rejects a name listed twice)."""
    manifest = _with(
        {
            "spec.replicas": None,
            "spec.resources": {"cpu": 2, "memory": "2048Mi"},
            "spec.env": [{"name": "EMPTY", "value": ""}, {"name": "HF_HOME", "value": "/cache/hf"}],
            "spec.scheduling": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": ""}]},
            "spec.autoscaling": {"engine": "hpa", "metric": "concurrency", "maxReplicas": 3, "target": 1000},
        }
    )
    manifest["metadata"]["name"] = "stored-as-is"
    service = InferenceService.from_body(api.create(ISVC_API, PLURAL, "team-a", manifest))
    client = KubeClient(kubernetes.config.new_client_from_config(str(control_plane.kubeconfig)))
    try:
        desired = build_children(service)
        written = client.execute(plan(desired, []))
        assert {kind for kind, _ in written} >= {"Deployment", "HorizontalPodAutoscaler", "Service"}
        observed = {(o["kind"], o["metadata"]["name"]): o for o in client.read_children(service)}
        drifts = {
            key: drifted_fields(want, observed[key])
            for want in desired
            if (key := (want["kind"], want["metadata"]["name"]))
        }
        assert not any(drifts.values()), drifts
        assert plan(desired, list(observed.values())).is_empty
    finally:
        api.delete(ISVC_API, PLURAL, "team-a", "stored-as-is")


def test_the_helm_chart_applies_to_the_api_server(kubectl):
    rendered = helm("template", "kvp", str(CHART), "--namespace", "kvpilot-system", "--include-crds")
    assert rendered.returncode == 0, rendered.stderr
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert any(d["kind"] == "CustomResourceDefinition" for d in documents)
    applied = kubectl.apply("--dry-run=server", "-f", "-", stdin=rendered.stdout, check=False)
    assert applied.returncode == 0, applied.stderr
