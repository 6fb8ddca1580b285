"""Revision identity: what makes a new revision, and what does not."""

import pytest
from kvpilot.operator.api import InferenceServiceSpec
from kvpilot.operator.revision import (
    NON_POD_FIELDS,
    POD_FIELDS,
    REVISION_HASH_LENGTH,
    pod_spec_fields,
    revision_deployment_name,
    revision_hash,
    with_pod_fields,
)

from tests.operator.test_builders import isvc


def test_every_spec_field_is_classified():
    # A new spec field must be sorted into one or the other, here and in revision.py.
    assert sorted(POD_FIELDS + NON_POD_FIELDS) == sorted(InferenceServiceSpec.model_fields)


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"name": "smollm2", "uri": "pvc://models/smollm2-v2"}},
        {"engine": {"quantization": "int8"}},
        {"image": "ghcr.io/kvpilot/kvpilot:0.2.0"},
        {"resources": {"gpu": {"count": 2}}},
        {"env": [{"name": "LOG_LEVEL", "value": "debug"}]},
        {"scheduling": {"nodeSelector": {"gpu": "h100"}}},
        {"podAnnotations": {"team": "a"}},
        {"engine": {"dtype": "bfloat16"}},
        {"engine": {"gpuMemoryUtilization": 0.8}},
        {"engine": {"kvCacheMemory": "2Gi"}},
        {"engine": {"loadTimeout": "1h"}},
        {"engine": {"drainTimeout": "5m"}},
        {"model": {"name": "smollm2", "uri": "hf://org/smollm2", "cache": {"size": "10Gi"}}},
    ],
    ids=lambda c: f"{next(iter(c))}.{next(iter(next(iter(c.values()))))}",
)
def test_a_change_of_the_pods_is_a_new_revision(change):
    assert revision_hash(isvc(**change).spec) != revision_hash(isvc().spec)


@pytest.mark.parametrize(
    "change",
    [
        {"replicas": 7},
        {"rollout": {"strategy": "Canary", "steps": [{"weight": 10}]}},
        {"autoscaling": {"minReplicas": 1, "maxReplicas": 4, "target": 0.7}},
        {
            "engine": {
                "quantization": "int4",
                "kvCacheDtype": "int8",
                "maxModelLen": 4096,
                "tensorParallelSize": 1,
            }
        },
        {
            "model": {
                "name": "smollm2",
                "uri": "pvc://models/smollm2",
                "architecture": {"known": "Llama-3-8B"},
            }
        },
        {"resources": {"gpu": {"count": 1, "memory": "80Gi"}, "memory": "16Gi"}},
    ],
    ids=["replicas", "rollout", "autoscaling", "a default spelled out", "architecture", "gpu memory"],
)
def test_replicas_rollout_settings_and_spelled_out_defaults_keep_the_revision(change):
    assert revision_hash(isvc(**change).spec) == revision_hash(isvc().spec)


def test_names_and_labels_fit_kubernetes_limits():
    revision = revision_hash(isvc().spec)
    assert len(revision) == REVISION_HASH_LENGTH and revision.isalnum() and revision.islower()
    assert revision_deployment_name(isvc(name="x" * 56), revision) == "x" * 56 + "-" + revision


def test_a_remembered_revision_restores_the_pods_but_not_the_replicas():
    old = isvc(engine={"quantization": "int8"})
    remembered = pod_spec_fields(old.spec)
    current = isvc(image="ghcr.io/kvpilot/kvpilot:0.2.0", replicas=5)
    restored = with_pod_fields(current, remembered)
    assert revision_hash(restored.spec) == revision_hash(old.spec)
    assert restored.spec.replicas == 5 and restored.spec.image == old.spec.image


UPSTREAM_KEY = {"upstreamApiKeySecretRef": {"name": "chat-keys", "key": "engine"}}


def test_the_upstream_key_reaches_the_engine_pods_so_it_is_part_of_the_revision():
    """spec.router.upstreamApiKeySecretRef becomes the servers' --api-key (env from the Secret):
    setting or changing it is a new revision; the other router settings are not."""
    from kvpilot.operator.builders import build_children

    plain, keyed = isvc(), isvc(router=UPSTREAM_KEY)
    other_key = isvc(router={"upstreamApiKeySecretRef": {"name": "chat-keys", "key": "engine-2"}})
    assert len({revision_hash(s.spec) for s in (plain, keyed, other_key)}) == 3

    def engine_env(service) -> list[dict]:
        deployment = next(
            c
            for c in build_children(service, "r1", 1)
            if c["kind"] == "Deployment" and "router" not in c["metadata"]["name"]
        )
        return deployment["spec"]["template"]["spec"]["containers"][0]["env"]

    assert engine_env(keyed) != engine_env(plain)  # what makes it pod-shaping
    for router in ({"replicas": 3}, {"enabled": False}, {"balancing": "prefix"}):
        assert revision_hash(isvc(router=router).spec) == revision_hash(plain.spec)
        assert revision_hash(isvc(router={**router, **UPSTREAM_KEY}).spec) == revision_hash(keyed.spec)


def test_a_remembered_revision_restores_its_upstream_key_and_keeps_the_other_router_settings():
    remembered = pod_spec_fields(isvc(router=UPSTREAM_KEY).spec)
    assert remembered["router"] == UPSTREAM_KEY
    current = isvc(router={"replicas": 3, "upstreamApiKeySecretRef": {"name": "new-keys", "key": "engine"}})
    restored = with_pod_fields(current, remembered)
    assert restored.spec.router.upstream_api_key_secret_ref.name == "chat-keys"
    assert restored.spec.router.replicas == 3
    # A revision remembered without a key restores none.
    restored = with_pod_fields(current, pod_spec_fields(isvc().spec))
    assert restored.spec.router.upstream_api_key_secret_ref is None and restored.spec.router.replicas == 3
