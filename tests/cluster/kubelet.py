"""The process kubelet: fake Nodes whose pods run as local processes.

    python -m tests.cluster.kubelet --kubeconfig K --workdir W [--nodes 2] [--gpus 1]

Registers the Nodes (tests/cluster/nodes.py), watches the pods bound to them and runs each in a
PodWorker (tests/cluster/pods.py) on its own pod address (tests/cluster/podnet.py). On SIGTERM it
stops every pod, deletes its Nodes and exits. The scheduler, the Deployment and ReplicaSet
controllers, the EndpointSlice controller and the garbage collector are the real ones.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.cluster.kubeapi import ApiError, KubeApi
from tests.cluster.nodes import NodeRegistry
from tests.cluster.podnet import AddressPool, ensure_pod_network
from tests.cluster.pods import PodWorker

SHUTDOWN_GRACE_SECONDS = 10


def node_names(count: int, prefix: str = "kvp-node") -> list[str]:
    return [f"{prefix}-{index}" for index in range(count)]


class ProcessKubelet:
    def __init__(self, kubeconfig: Path, workdir: Path, nodes: list[str], gpus: int) -> None:
        self.api = KubeApi(kubeconfig)
        self.workdir = workdir
        self.nodes = NodeRegistry(self.api, nodes, gpus)
        self.addresses = AddressPool()
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self) -> None:
        ensure_pod_network()
        self.nodes.register()
        print(f"process kubelet: nodes {', '.join(self.nodes.names)} registered", flush=True)
        while not self.stopping.is_set():
            try:
                self._list_and_watch()
            except (ApiError, httpx.HTTPError) as error:
                if not self.stopping.is_set():
                    print(f"process kubelet: watch interrupted ({error}); listing again", flush=True)
                    time.sleep(1)

    def _list_and_watch(self) -> None:
        listing = self.api.request("GET", "/api/v1/pods")
        for pod in listing["items"]:
            self._on_pod("ADDED", pod)
        version = listing["metadata"]["resourceVersion"]
        while not self.stopping.is_set():
            for event in self.api.watch("v1", "pods", resourceVersion=version, timeout_seconds=30):
                if event["type"] == "ERROR":
                    return  # 410 Gone and the like: list again
                version = event["object"]["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    self._on_pod(event["type"], event["object"])
                if self.stopping.is_set():
                    return

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        if pod["spec"].get("nodeName") not in self.nodes.names:
            return
        uid, metadata = pod["metadata"]["uid"], pod["metadata"]
        with self.lock:
            worker = self.workers.get(uid)
            if kind == "DELETED":
                if worker:
                    worker.gone.set()
                return
            if worker is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return
                if metadata.get("deletionTimestamp"):  # never started here: nothing to stop
                    with contextlib.suppress(ApiError, httpx.HTTPError):
                        self.api.delete(
                            "v1", "pods", metadata["namespace"], metadata["name"], gracePeriodSeconds=0
                        )
                    return
                worker = PodWorker(
                    self.api, pod, self.addresses.take(), self.workdir / "pods", self._worker_done
                )
                self.workers[uid] = worker
                worker.start()
            if metadata.get("deletionTimestamp"):
                worker.request_delete(metadata.get("deletionGracePeriodSeconds") or 0)

    def _worker_done(self, worker: PodWorker) -> None:
        with self.lock:
            self.workers.pop(worker.key, None)
        self.addresses.release(worker.ip)

    def shutdown(self) -> None:
        """Stop every pod (SIGTERM, a short grace, SIGKILL) and delete the Nodes."""
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.request_delete(SHUTDOWN_GRACE_SECONDS)
        for worker in workers:
            worker.join(timeout=SHUTDOWN_GRACE_SECONDS + 5)
        self.nodes.close(delete=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.kubelet", description=__doc__)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=1, help="nvidia.com/gpu capacity of each node")
    args = parser.parse_args(argv)
    kubelet = ProcessKubelet(args.kubeconfig, args.workdir, node_names(args.nodes), args.gpus)
    done = threading.Event()

    def on_signal(signum, frame) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=kubelet.run, name="pod-watch", daemon=True)
    thread.start()
    while not done.wait(0.5):
        if not thread.is_alive():
            print("process kubelet: the watch loop died", file=sys.stderr, flush=True)
            break
    kubelet.shutdown()
    print("process kubelet: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
