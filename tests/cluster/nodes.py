"""Fake Nodes for the process kubelet: registered with real capacity, kept alive by Leases.

The scheduler places pods by the capacity reported here (`nvidia.com/gpu: 1` per node by default),
and the node lifecycle controller keeps the nodes Ready while their Leases are renewed.
"""

from __future__ import annotations

import contextlib
import datetime
import threading

import httpx

from tests.cluster.build import KUBERNETES_VERSION
from tests.cluster.kubeapi import ApiError, KubeApi

LEASE_SECONDS = 40
RENEW_SECONDS = 10
NODE_CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}


def now_rfc3339(micro: bool = False) -> str:
    moment = datetime.datetime.now(datetime.UTC)
    if micro:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def node_manifest(name: str, gpus: int) -> dict:
    capacity = {**NODE_CAPACITY, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    stamp = now_rfc3339()
    conditions = [
        {"type": kind, "status": "False", "reason": f"KubeletHas{healthy}", "message": "process kubelet"}
        for kind, healthy in (
            ("MemoryPressure", "SufficientMemory"),
            ("DiskPressure", "NoDiskPressure"),
            ("PIDPressure", "SufficientPID"),
        )
    ]
    conditions.append(
        {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "process kubelet is ready"}
    )
    for condition in conditions:
        condition.update(lastHeartbeatTime=stamp, lastTransitionTime=stamp)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kvpilot.dev/process-kubelet": "true",
            },
        },
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "kubeletVersion": f"{KUBERNETES_VERSION}-process",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "process://local",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "osImage": "process kubelet",
                "kernelVersion": "",
                "machineID": name,
                "systemUUID": name,
                "bootID": name,
            },
        },
    }


class NodeRegistry:
    """Registers the nodes, renews their Leases in a thread, deletes them on close()."""

    def __init__(self, api: KubeApi, names: list[str], gpus: int) -> None:
        self.api, self.names, self.gpus = api, names, gpus
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_forever, name="node-leases", daemon=True)

    def register(self) -> None:
        for name in self.names:
            manifest = node_manifest(name, self.gpus)
            self.api.delete("v1", "nodes", None, name, gracePeriodSeconds=0)  # a leftover of a killed run
            self.api.create("v1", "nodes", None, manifest)
            self.api.patch("v1", "nodes", None, name, {"status": manifest["status"]}, sub="status")
            self._renew(name)
        self._thread.start()

    def _renew(self, name: str) -> None:
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now_rfc3339(True),
            },
        }
        self.api.patch(
            "coordination.k8s.io/v1", "leases", "kube-node-lease", name, lease, kind="apply",
            fieldManager="process-kubelet", force="true",
        )  # fmt: skip

    def _renew_forever(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            for name in self.names:
                try:
                    self._renew(name)
                except (ApiError, httpx.HTTPError) as error:  # the API server may be down for a moment
                    print(f"process kubelet: lease of {name} not renewed: {error}", flush=True)

    def close(self, delete: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if delete:
            for name in self.names:
                with contextlib.suppress(ApiError, httpx.HTTPError):
                    self.api.delete("v1", "nodes", None, name, gracePeriodSeconds=0)
