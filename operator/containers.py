"""What every pod the operator builds shares: the restricted security context (Pod Security
Standards "restricted"), HTTP probes on the container's named port, and the ClusterIP Service
in front of such pods."""

from __future__ import annotations

from typing import Any

from kvpilot.operator.labels import SERVICE_PORT
from kvpilot.serving.contract import PORT_NAME

RUN_AS_USER = 65532  # the kvpilot image's user (Dockerfile)


def security_context() -> dict[str, Any]:
    """A container's: no privilege escalation, read-only root, no capabilities, RuntimeDefault seccomp."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def http_probe(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def cluster_ip_service(metadata: dict[str, Any], selector: dict[str, str]) -> dict[str, Any]:
    """A ClusterIP Service on SERVICE_PORT, to the selected pods' named port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }
