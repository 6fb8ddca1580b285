"""The test-side handles: the process kubelet as a managed process, and waiting helpers."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.cluster.controlplane import ControlPlane, ControlPlaneError
from tests.cluster.kubeapi import KubeApi
from tests.cluster.kubelet import SHUTDOWN_GRACE_SECONDS, node_names
from tests.cluster.processes import ManagedProcess, log_tail, stop_pid
from tests.cluster.tools import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond
    return {}


class ProcessKubeletRunner:
    """`python -m tests.cluster.kubelet` beside a control plane; `api` talks to that control plane."""

    def __init__(self, control_plane: ControlPlane, nodes: int = 2, gpus: int = 1) -> None:
        self.control_plane = control_plane
        self.node_names = node_names(nodes)
        workdir = control_plane.workdir / "kubelet"
        command = [
            sys.executable, "-m", "tests.cluster.kubelet",
            "--kubeconfig", str(control_plane.kubeconfig), "--workdir", str(workdir),
            "--nodes", str(nodes), "--gpus", str(gpus),
        ]  # fmt: skip
        self.process = ManagedProcess(
            "process-kubelet", command, control_plane.workdir / "logs" / "kubelet.log"
        )
        self.workdir = workdir
        self.api = KubeApi(control_plane.kubeconfig)

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def start(self) -> None:
        self.process.start(cwd=REPO_ROOT)  # `python -m tests.cluster.kubelet` from the checkout
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.exited():
                raise ControlPlaneError(f"the process kubelet exited:\n{log_tail(self.process.log)}")
            if all(
                condition(self.api.get("v1", "nodes", None, n), "Ready").get("status") == "True"
                for n in self.node_names
            ):
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"the process kubelet's nodes are not Ready:\n{log_tail(self.process.log)}")

    def stop(self) -> None:
        if self.process.popen is not None:
            stop_pid(self.process.popen.pid, timeout=SHUTDOWN_GRACE_SECONDS + 20, process=self.process.popen)
        self.api.close()

    def pod_logs(self, namespace: str, name: str, container: str) -> str:
        """What a pod's container printed (kubectl logs has no kubelet to ask)."""
        for directory in (self.workdir / "pods").glob(f"{namespace}_{name}_*"):
            log = directory / "logs" / f"{container}.log"
            if log.exists():
                return log.read_text(errors="replace")
        return ""


class OperatorProcess:
    """`python -m kvpilot.operator.cli operator` as its own process and its own API identity."""

    USER = "kvpilot-operator"

    def __init__(self, control_plane: ControlPlane, *args: str) -> None:
        self.control_plane = control_plane
        self.port = free_port()
        command = [sys.executable, "-m", "kvpilot.operator.cli", "operator", *args]
        command += ["--liveness", f"http://127.0.0.1:{self.port}/healthz"]
        log = control_plane.workdir / "logs" / f"operator-{time.monotonic_ns()}.log"
        self.process = ManagedProcess("kvpilot-operator", command, log)

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.control_plane.kubeconfig_for(self.USER))}
        self.process.start(env=env)
        wait_for(lambda: self.process.exited() or self.healthz() == 200, "the operator's liveness endpoint")
        if self.process.exited():
            raise ControlPlaneError(f"the operator exited:\n{log_tail(self.process.log)}")
        return self

    def healthz(self) -> int | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code
        except httpx.HTTPError:
            return None

    def stop(self) -> int | None:
        """SIGTERM (kopf stops cleanly), then the exit code."""
        self.process.stop()
        return self.process.popen.returncode if self.process.popen else None

    def output(self) -> str:
        return self.process.log.read_text(errors="replace") if self.process.log.exists() else ""

    def requests(self) -> list[dict]:
        """The operator's API requests so far (audit events: verb, objectRef, requestURI, ...)."""
        return self.control_plane.audit_events(self.USER)

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def provide_model_volume(api: KubeApi, namespace: str, host_dir: Path, claim: str = "models") -> None:
    """PVC `claim` in `namespace`, bound to a hostPath PV on `host_dir` (where the kubelet finds it)."""
    volume = f"{claim}-{namespace}"
    api.create(
        "v1",
        "persistentvolumes",
        None,
        {
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(host_dir)},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
    )
    api.create(
        "v1",
        "persistentvolumeclaims",
        namespace,
        {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    wait_for(
        lambda: (
            (api.get("v1", "persistentvolumeclaims", namespace, claim) or {}).get("status", {}).get("phase")
            == "Bound"
        ),
        f"PVC {namespace}/{claim} to be bound",
        timeout=120,  # the controller-manager's volume binder, just started on a busy machine
    )
