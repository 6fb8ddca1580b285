"""The test-side handles: the process kubelet as a managed process, and waiting helpers."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.cluster.controlplane import ControlPlane, ControlPlaneError, ManagedProcess, log_tail, stop_pid
from tests.cluster.kubeapi import KubeApi
from tests.cluster.kubelet import SHUTDOWN_GRACE_SECONDS, node_names

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
