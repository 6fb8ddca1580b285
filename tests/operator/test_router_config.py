"""EndpointSlices -> the router's config (pure): only ready endpoints, tenants as key files."""

from typing import Any

import pytest
import yaml
from kvpilot.operator.api.validation import duration_seconds
from kvpilot.operator.router_config import (
    RevisionEndpoints,
    ready_endpoints,
    revision_endpoints,
    router_config,
)

from tests.operator.test_builders import TENANTS, isvc


def endpoint(address: str, **conditions: Any) -> dict[str, Any]:
    return {"addresses": [address], "conditions": conditions}


def endpoint_slice(service: str, endpoints: list, port: int = 8000, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"kubernetes.io/service-name": service}},
        "addressType": extra.get("addressType", "IPv4"),
        "ports": extra.get("ports", [{"name": "http", "port": port, "protocol": "TCP"}]),
        "endpoints": endpoints,
    }


CASES = [
    ("no slices", [], {}),
    (
        "ready",
        [endpoint_slice("chat-engine", [endpoint("10.0.0.6", ready=True)])],
        {"chat-engine": ("http://10.0.0.6:8000",)},
    ),
    (
        "not ready: left out",
        [endpoint_slice("chat-engine", [endpoint("10.0.0.6", ready=False)])],
        {"chat-engine": ()},
    ),
    (
        "ready unset means ready (discovery/v1)",
        [endpoint_slice("chat-engine", [endpoint("10.0.0.6")])],
        {"chat-engine": ("http://10.0.0.6:8000",)},
    ),
    (
        "terminating: no new requests",
        [endpoint_slice("chat-engine", [endpoint("10.0.0.6", ready=False, serving=True, terminating=True)])],
        {"chat-engine": ()},
    ),
    (
        "two slices, one address in both, sorted",
        [
            endpoint_slice(
                "chat-engine", [endpoint("10.0.0.9", ready=True), endpoint("10.0.0.10", ready=True)]
            ),
            endpoint_slice(
                "chat-engine", [endpoint("10.0.0.9", ready=True), endpoint("10.0.0.2", ready=False)]
            ),
        ],
        {"chat-engine": ("http://10.0.0.10:8000", "http://10.0.0.9:8000")},
    ),
    (
        "IPv6 in brackets",
        [endpoint_slice("chat-engine", [endpoint("fd00::5", ready=True)], addressType="IPv6")],
        {"chat-engine": ("http://[fd00::5]:8000",)},
    ),
    (
        "FQDN slices are not pods",
        [endpoint_slice("chat-engine", [endpoint("a.example")], addressType="FQDN")],
        {},
    ),
    ("no http port yet", [endpoint_slice("chat-engine", [endpoint("10.0.0.6", ready=True)], ports=[])], {}),
    (
        "per Service",
        [
            endpoint_slice("a", [endpoint("10.0.0.1", ready=True)]),
            endpoint_slice("b", [endpoint("10.0.0.2", ready=True)], port=9000),
        ],
        {"a": ("http://10.0.0.1:8000",), "b": ("http://10.0.0.2:9000",)},
    ),
]


@pytest.mark.parametrize(("slices", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_ready_endpoints_table(slices, expected):
    assert ready_endpoints(slices) == expected


def test_one_stable_revision_fed_by_the_engine_service():
    slices = [
        endpoint_slice("chat-engine", [endpoint("10.0.0.6", ready=True)]),
        endpoint_slice("chat", [endpoint("10.0.0.99", ready=True)], port=8080),  # the router's own
    ]
    assert revision_endpoints(isvc(), slices) == [RevisionEndpoints("stable", 100, ("http://10.0.0.6:8000",))]
    assert revision_endpoints(isvc(), []) == [RevisionEndpoints("stable", 100, ())]


def test_config_has_the_issue_shape_with_key_files_not_keys():
    service = isvc(tenants=TENANTS, router={"balancing": "least-request"})
    config = router_config(service, [RevisionEndpoints("stable", 100, ("http://10.0.0.6:8000",))])
    assert config == {
        "models": [
            {
                "name": "smollm2",
                "revisions": [{"name": "stable", "weight": 100, "endpoints": ["http://10.0.0.6:8000"]}],
                "balancing": "least-request",
                "activation": {"timeout": "300s", "maxQueued": 1000},
            }
        ],
        "tenants": [
            {
                "name": "team-a",
                "keyFile": "/etc/kvpilot/keys/team-a",
                "models": ["smollm2"],
                "requestsPerMinute": 600,
                "tokensPerMinute": 200000,
            },
            {"name": "team-b", "keyFile": "/etc/kvpilot/keys/team-b"},
        ],
    }


@pytest.mark.parametrize(
    ("activation", "rendered"),
    [
        ({}, {"timeout": "300s", "maxQueued": 1000}),
        ({"timeout": "5m", "maxQueued": 1}, {"timeout": "300s", "maxQueued": 1}),
        ({"timeout": "1m30s"}, {"timeout": "90s", "maxQueued": 1000}),  # the router reads one unit
        ({"timeout": "1500ms"}, {"timeout": "1.5s", "maxQueued": 1000}),
        ({"timeout": "2h", "maxQueued": 1_000_000}, {"timeout": "7200s", "maxQueued": 1_000_000}),
    ],
)
def test_activation_is_rendered_in_seconds_the_router_reads(activation, rendered):
    from kvpilot.serving.router.config import parse_config

    service = isvc(router={"activation": activation})
    config = router_config(service, revision_endpoints(service, []))
    assert config["models"][0]["activation"] == rendered
    loaded = parse_config(yaml.safe_dump(config)).models[0].activation
    expected_seconds = duration_seconds(service.spec.router.activation.timeout)
    assert (loaded.timeout, loaded.max_queued) == (expected_seconds, rendered["maxQueued"])


def test_without_tenants_there_is_no_tenants_key():
    config = router_config(isvc(), revision_endpoints(isvc(), []))
    assert "tenants" not in config
    assert config["models"][0]["revisions"] == [{"name": "stable", "weight": 100, "endpoints": []}]
    assert config["models"][0]["balancing"] == "prefix"


RENDERED_SPECS = [
    {},
    {"tenants": TENANTS},
    {"router": {"balancing": "random", "replicas": 1}, "model": {"name": "org/model:v1", "uri": "pvc://m"}},
    {"tenants": [{"name": "solo", "apiKeySecretRef": {"name": "k", "key": "k"}, "tokensPerMinute": 1}]},
    {"tenants": TENANTS, "router": {"upstreamApiKeySecretRef": {"name": "engine-key", "key": "key"}}},
    {"router": {"activation": {"timeout": "1m0.5s", "maxQueued": 1}}},
]
ENDPOINT_SETS = [
    [],
    [endpoint_slice("chat-engine", [endpoint("10.0.0.6"), endpoint("10.0.0.7", ready=False)])],
]


@pytest.mark.parametrize("spec", RENDERED_SPECS, ids=range(len(RENDERED_SPECS)))
@pytest.mark.parametrize("slices", ENDPOINT_SETS, ids=["no endpoints", "one ready"])
def test_every_rendered_config_validates_with_the_routers_own_model(spec, slices):
    from kvpilot.operator.router_builders import build_router_config_map
    from kvpilot.serving.router.config import parse_config

    service = isvc(**spec)
    config_map = build_router_config_map(service, revision_endpoints(service, slices))
    loaded = parse_config(config_map["data"]["router.yaml"])  # what `kvpilot router` reads
    (model,) = loaded.models
    assert model.name == service.spec.model.name
    assert [r.endpoints for r in model.revisions] == [["http://10.0.0.6:8000"] if slices else []]
    assert [t.key_file for t in loaded.tenants or []] == [
        f"/etc/kvpilot/keys/{t.name}" for t in service.spec.tenants
    ]
    activation = service.spec.router.activation
    assert model.activation.timeout == duration_seconds(activation.timeout)
    assert model.activation.max_queued == activation.max_queued
