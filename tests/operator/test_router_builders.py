"""The router's children (pure builders): plain dict assertions."""

import yaml
from kvpilot.operator.builders import build_children, build_deployment, build_service
from kvpilot.operator.router_builders import (
    build_inference_pool,
    build_router_config_map,
    build_router_deployment,
    build_router_pod_disruption_budget,
    build_router_service,
)
from kvpilot.operator.router_config import KEYS_DIR, RevisionEndpoints, revision_endpoints, router_config
from kvpilot.serving.cli import build_parser

from tests.operator.test_builders import TENANTS, container, isvc


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_router_deployment_runs_kvpilot_router_hardened():
    deployment = build_router_deployment(isvc(image="registry.local/kvpilot:dev"))
    router = container(deployment)
    assert deployment["metadata"]["name"] == "chat-router"
    assert deployment["spec"]["replicas"] == 2
    assert router["image"] == "registry.local/kvpilot:dev"  # the engine's image
    assert router["command"] == ["kvpilot", "router"]
    assert router["args"] == [
        "--config",
        "/etc/kvpilot/router/router.yaml",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--max-held-bytes",
        str(512 * 2**20 // 4),  # a quarter of the memory limit, for the bodies held from zero
    ]
    parsed = build_parser(["router"]).parse_args(["router", *router["args"]])
    assert parsed.max_held_bytes == 128 * 2**20 and parsed.port == 8080
    assert router["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert router["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert router["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert router["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert router["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "config", "mountPath": "/etc/kvpilot/router", "readOnly": True} in router["volumeMounts"]
    assert {"name": "config", "configMap": {"name": "chat-router"}} in pod["volumes"]
    assert "keys" not in [v["name"] for v in pod["volumes"]]  # no tenants: no Secret mounted
    assert "nodeSelector" not in pod and "tolerations" not in pod  # not on the GPU nodes


def test_router_spec_sets_replicas_and_resources():
    service = isvc(router={"replicas": 3, "resources": {"cpu": 1, "memory": "1Gi"}})
    deployment = build_router_deployment(service)
    assert deployment["spec"]["replicas"] == 3
    assert container(deployment)["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"memory": "1Gi"},
    }
    assert build_router_pod_disruption_budget(service)["spec"] == {
        "maxUnavailable": 1,
        "selector": {
            "matchLabels": {"app.kubernetes.io/name": "kvpilot-router", "app.kubernetes.io/instance": "chat"}
        },
    }


def test_the_name_service_points_at_the_router_and_the_engine_gets_its_own():
    service = isvc()
    front, engine = build_router_service(service), build_service(service)
    router_pods = build_router_deployment(service)["spec"]["template"]["metadata"]["labels"]
    engine_pods = build_deployment(service)["spec"]["template"]["metadata"]["labels"]
    assert (front["metadata"]["name"], engine["metadata"]["name"]) == ("chat", "chat-engine")
    assert selects(front["spec"]["selector"], router_pods) and not selects(
        front["spec"]["selector"], engine_pods
    )
    assert selects(engine["spec"]["selector"], engine_pods) and not selects(
        engine["spec"]["selector"], router_pods
    )
    # Neither Deployment's selector takes the other's pods.
    router_selector = build_router_deployment(service)["spec"]["selector"]["matchLabels"]
    engine_selector = build_deployment(service)["spec"]["selector"]["matchLabels"]
    assert not selects(router_selector, engine_pods) and not selects(engine_selector, router_pods)
    assert front["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    # Without the router, `chat` is the engine's Service again.
    direct = build_service(isvc(router={"enabled": False}))
    assert direct["metadata"]["name"] == "chat" and selects(direct["spec"]["selector"], engine_pods)


def test_tenants_secrets_are_mounted_exactly_read_only_at_the_key_files():
    service = isvc(tenants=TENANTS)
    deployment = build_router_deployment(service)
    pod = deployment["spec"]["template"]["spec"]
    (keys,) = [v for v in pod["volumes"] if v["name"] == "keys"]
    assert keys == {
        "name": "keys",
        "projected": {
            "sources": [
                {
                    "secret": {
                        "name": "router-keys",
                        "items": [{"key": "team-a", "path": "team-a"}],
                        "optional": False,
                    }
                },
                {
                    "secret": {
                        "name": "team-b-key",
                        "items": [{"key": "api-key", "path": "team-b"}],
                        "optional": False,
                    }
                },
            ],
            "defaultMode": 0o440,
        },
    }
    assert {"name": "keys", "mountPath": KEYS_DIR, "readOnly": True} in container(deployment)["volumeMounts"]
    # Every keyFile in the config is a file of that volume, under its mount.
    config = router_config(service, revision_endpoints(service, []))
    mounted = {
        f"{KEYS_DIR}/{item['path']}" for s in keys["projected"]["sources"] for item in s["secret"]["items"]
    }
    assert {tenant["keyFile"] for tenant in config["tenants"]} == mounted
    # The engine pods never see a tenant's Secret.
    assert "router-keys" not in yaml.safe_dump(build_deployment(service))


def test_config_map_holds_the_config_and_endpoints_never_roll_the_router():
    service = isvc(tenants=TENANTS)
    ready = [RevisionEndpoints("stable", 100, ("http://10.0.0.5:8000", "http://10.0.0.6:8000"))]
    config_map = build_router_config_map(service, ready)
    assert config_map["metadata"]["name"] == "chat-router"
    assert yaml.safe_load(config_map["data"]["router.yaml"]) == router_config(service, ready)
    before = {(c["kind"], c["metadata"]["name"]): c for c in build_children(service)}
    after = {(c["kind"], c["metadata"]["name"]): c for c in build_children(service, revision_list=ready)}
    changed = sorted(key for key in before if before[key] != after[key])
    assert changed == [("ConfigMap", "chat-router")]


def test_inference_pool_selects_the_engine_pods_on_port_8000():
    pool = build_inference_pool(isvc())
    engine_pods = build_deployment(isvc())["spec"]["template"]["metadata"]["labels"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1" and pool["kind"] == "InferencePool"
    assert pool["metadata"]["name"] == "chat"
    assert selects(pool["spec"]["selector"]["matchLabels"], engine_pods)
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "chat-epp", "port": {"number": 9002}}


def test_upstream_key_locks_the_engine_to_the_router():
    service = isvc(router={"upstreamApiKeySecretRef": {"name": "engine-key", "key": "key"}})
    engine_env = container(build_deployment(service))["env"]
    assert engine_env[-1] == {
        "name": "KVPILOT_API_KEY",  # `kvpilot serve --api-key`, resolved by the kubelet
        "valueFrom": {"secretKeyRef": {"name": "engine-key", "key": "key"}},
    }
    router = build_router_deployment(service)
    pod = router["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "upstream-key"]
    assert volume["projected"]["sources"] == [
        {"secret": {"name": "engine-key", "items": [{"key": "key", "path": "key"}], "optional": False}}
    ]
    mount = {"name": "upstream-key", "mountPath": "/etc/kvpilot/upstream", "readOnly": True}
    assert mount in container(router)["volumeMounts"]
    config = router_config(service, revision_endpoints(service, []))
    assert config["upstreamApiKeyFile"] == "/etc/kvpilot/upstream/key"
    # Without it: no key anywhere.
    assert "KVPILOT_API_KEY" not in yaml.safe_dump(build_deployment(isvc()))
    assert "upstreamApiKeyFile" not in router_config(isvc(), [])
