"""The router's config file, the contract between the operator and `kvpilot router` (pure).

It is computed from the spec and the engine pods' EndpointSlices: each revision of the model is
(name, weight, ready endpoints). Today an InferenceService has one revision, `stable`, served by
its engine Service; a rollout adds more, each with its own Service and weight. Tenants' keys are
never in it: only the paths where the router pods mount the tenants' Secrets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvpilot.operator.api import InferenceService
from kvpilot.operator.api.router import ActivationSpec, TenantSpec
from kvpilot.operator.api.validation import duration_seconds
from kvpilot.operator.labels import engine_service_name
from kvpilot.serving.contract import PORT_NAME

STABLE_REVISION = "stable"
CONFIG_DIR = "/etc/kvpilot/router"
CONFIG_KEY = "router.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
KEYS_DIR = "/etc/kvpilot/keys"
UPSTREAM_KEY_DIR = "/etc/kvpilot/upstream"
UPSTREAM_KEY_FILE = f"{UPSTREAM_KEY_DIR}/key"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set by the EndpointSlice controller


@dataclass(frozen=True)
class Revision:
    """A revision of the model: its share of new requests and the Service its endpoints belong to."""

    name: str
    weight: int
    service: str


@dataclass(frozen=True)
class RevisionEndpoints:
    name: str
    weight: int
    endpoints: tuple[str, ...]  # http://ADDRESS:PORT of ready engine pods, sorted


def revisions(isvc: InferenceService) -> list[Revision]:
    return [Revision(STABLE_REVISION, 100, engine_service_name(isvc))]


def _is_ready(endpoint: dict[str, Any]) -> bool:
    # discovery.k8s.io/v1: an unset `ready` means ready; a terminating endpoint takes no new requests.
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False and not conditions.get("terminating")


def ready_endpoints(slices: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """EndpointSlices -> Service name -> the URLs of its ready endpoints (deduplicated, sorted)."""
    by_service: dict[str, set[str]] = {}
    for endpoint_slice in slices:
        service = (endpoint_slice.get("metadata", {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        ports = [p.get("port") for p in endpoint_slice.get("ports") or [] if p.get("name") == PORT_NAME]
        address_type = endpoint_slice.get("addressType")
        if not service or not ports or not ports[0] or address_type not in ("IPv4", "IPv6"):
            continue
        urls = by_service.setdefault(service, set())
        for endpoint in endpoint_slice.get("endpoints") or []:
            if not _is_ready(endpoint):
                continue
            for address in endpoint.get("addresses") or []:
                host = f"[{address}]" if address_type == "IPv6" else address
                urls.add(f"http://{host}:{ports[0]}")
    return {service: tuple(sorted(urls)) for service, urls in by_service.items()}


def revision_endpoints(isvc: InferenceService, slices: list[dict[str, Any]]) -> list[RevisionEndpoints]:
    """Each revision with the ready endpoints of its Service (none when nothing is ready)."""
    ready = ready_endpoints(slices)
    return [RevisionEndpoints(r.name, r.weight, ready.get(r.service, ())) for r in revisions(isvc)]


def key_file(tenant: TenantSpec) -> str:
    """Where the router pods find the tenant's key (a projected Secret volume)."""
    return f"{KEYS_DIR}/{tenant.name}"


def _tenant(tenant: TenantSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": tenant.name, "keyFile": key_file(tenant)}
    optional = {
        "models": tenant.models,
        "requestsPerMinute": tenant.requests_per_minute,
        "tokensPerMinute": tenant.tokens_per_minute,
    }
    return entry | {k: v for k, v in optional.items() if v is not None}


def _activation(activation: ActivationSpec) -> dict[str, Any]:
    # The router reads `300s`-style single-unit durations; a Go duration such as 1m30s becomes 90s.
    seconds = f"{duration_seconds(activation.timeout):.3f}".rstrip("0").rstrip(".")
    return {"timeout": f"{seconds}s", "maxQueued": activation.max_queued}


def router_config(isvc: InferenceService, revision_list: Sequence[RevisionEndpoints]) -> dict[str, Any]:
    """The config `kvpilot router --config` reads (the issue's shape)."""
    model = {
        "name": isvc.spec.model.name,
        "revisions": [
            {"name": r.name, "weight": r.weight, "endpoints": list(r.endpoints)} for r in revision_list
        ],
        "balancing": isvc.spec.router.balancing,
        "activation": _activation(isvc.spec.router.activation),
    }
    config: dict[str, Any] = {"models": [model]}
    if isvc.spec.tenants:
        config["tenants"] = [_tenant(tenant) for tenant in isvc.spec.tenants]
    if isvc.spec.router.upstream_api_key_secret_ref is not None:
        config["upstreamApiKeyFile"] = UPSTREAM_KEY_FILE
    return config


def referenced_secrets(isvc: InferenceService) -> dict[str, list[str]]:
    """Secret name -> the spec fields that reference it (tenants' keys, the upstream key)."""
    fields: dict[str, list[str]] = {}
    for index, tenant in enumerate(isvc.spec.tenants):
        fields.setdefault(tenant.api_key_secret_ref.name, []).append(f"spec.tenants[{index}] ({tenant.name})")
    upstream = isvc.spec.router.upstream_api_key_secret_ref
    if upstream is not None:
        fields.setdefault(upstream.name, []).append("spec.router.upstreamApiKeySecretRef")
    return fields
