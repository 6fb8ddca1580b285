"""The chart's cluster-wide defaults: `kvpilot operator --default-model-cache-*` -> the handlers'
environment -> every downloaded model without a cache of its own gets the cluster's claim and Job
(pure rule, the CLI's checks, and one reconcile against the API emulator)."""

import subprocess
import sys

import kubernetes.client
import pytest
from kvpilot.operator.api import InferenceService
from kvpilot.operator.api.model import ModelCacheSpec
from kvpilot.operator.defaults import MODEL_CACHE_ENV, NO_DEFAULTS, ClusterDefaults, with_cluster_defaults
from kvpilot.operator.executor import KubeClient
from kvpilot.operator.reconciler import reconcile
from kvpilot.operator.revision import revision_hash

from tests.operator.test_reconciler import ISVC, NOW

CLUSTER_CACHE = ClusterDefaults(ModelCacheSpec(size="200Gi", storage_class_name="fast"))


def isvc(uri: str, cache: dict | None = None) -> InferenceService:
    model = {"name": "m", "uri": uri, **({"cache": cache} if cache else {})}
    body = {"metadata": {"name": "chat", "namespace": "ns"}, "spec": {"model": model}}
    return InferenceService.from_body(body)


@pytest.mark.parametrize(
    ("uri", "own_cache", "expected_size"),
    [
        ("hf://org/model", None, "200Gi"),  # downloaded, no cache of its own: the cluster's
        ("s3://bucket/model", None, "200Gi"),
        ("gs://bucket/model", None, "200Gi"),
        ("hf://org/model", {"size": "50Gi"}, "50Gi"),  # its own wins
        ("pvc://models/m", None, None),  # already on a volume
        ("oci://registry/model:1", None, None),  # an image volume
    ],
)
def test_a_downloaded_model_without_its_own_cache_gets_the_clusters(uri, own_cache, expected_size):
    cache = with_cluster_defaults(isvc(uri, own_cache), CLUSTER_CACHE).spec.model.cache
    assert (cache.size if cache else None) == expected_size
    assert with_cluster_defaults(isvc(uri, own_cache), NO_DEFAULTS) == isvc(uri, own_cache)


def test_the_default_changes_the_revision_because_it_changes_the_pods():
    plain = isvc("hf://org/model")
    assert revision_hash(with_cluster_defaults(plain, CLUSTER_CACHE).spec) != revision_hash(plain.spec)


def test_the_defaults_travel_through_the_environment_unchanged():
    environ = CLUSTER_CACHE.to_environ()
    assert list(environ) == [MODEL_CACHE_ENV]
    assert ClusterDefaults.from_environ(environ) == CLUSTER_CACHE
    assert ClusterDefaults.from_environ({}) == NO_DEFAULTS and NO_DEFAULTS.to_environ() == {}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--default-model-cache-size", "lots"], "--default-model-cache-size: Value error, 'lots' is not"),
        (
            ["--default-model-cache-size", "1Gi", "--default-model-cache-access-mode", "Sometimes"],
            "--default-model-cache-access-mode: Input should be",
        ),
        (["--default-model-cache-storage-class", "fast"], "--default-model-cache-size is required"),
    ],
)
def test_bad_default_flags_are_refused_naming_the_flag(flags, message):
    command = [sys.executable, "-m", "kvpilot.serving.cli", "operator", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert f"error: {message}" in result.stderr


def test_a_reconcile_with_the_clusters_default_creates_the_claim_and_the_download_job(apiserver, kubectl):
    client = KubeClient(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=apiserver.url)))
    ns = "rec-defaults"
    body = {
        "apiVersion": ISVC[0],
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": ns},
        "spec": {"model": {"name": "m", "uri": "hf://org/model"}, "router": {"enabled": False}},
    }
    kubectl.create(*ISVC, ns, body)
    reconcile(kubectl.get(*ISVC, ns, "chat"), client, NOW, CLUSTER_CACHE)
    (claim,) = kubectl.list("v1", "persistentvolumeclaims", ns)
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert len(kubectl.list("batch/v1", "jobs", ns)) == 1
    (deployment,) = kubectl.list("apps/v1", "deployments", ns)
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"claimName": claim["metadata"]["name"], "readOnly": True} in [
        v.get("persistentVolumeClaim") for v in volumes
    ]
