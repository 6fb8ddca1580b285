"""One pod of the process kubelet, run by one thread: volumes, init containers, containers,
status reports, and graceful deletion (preStop, SIGTERM, the grace period, SIGKILL).
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.cluster.containers import Container
from tests.cluster.kubeapi import ApiError, KubeApi
from tests.cluster.nodes import now_rfc3339
from tests.cluster.podspec import PodContext, container_argv, is_kvpilot_image

TICK_SECONDS = 0.2


class VolumeError(RuntimeError):
    pass


def local_volumes(api: KubeApi, pod: dict[str, Any], directory: Path) -> dict[str, Path]:
    """Each volume of the pod as a local directory (PVCs through their bound PV's hostPath)."""
    namespace = pod["metadata"]["namespace"]
    volumes: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes") or []:
        name, local = volume["name"], directory / "volumes" / volume["name"]
        if "hostPath" in volume:
            volumes[name] = Path(volume["hostPath"]["path"])
            continue
        if "persistentVolumeClaim" in volume:
            claim_name = volume["persistentVolumeClaim"]["claimName"]
            claim = api.get("v1", "persistentvolumeclaims", namespace, claim_name)
            bound = (claim or {}).get("spec", {}).get("volumeName")
            volume_spec = (
                (api.get("v1", "persistentvolumes", None, bound) or {}).get("spec", {}) if bound else {}
            )
            source = volume_spec.get("hostPath") or volume_spec.get("local")
            if not source:
                raise VolumeError(
                    f"persistentVolumeClaim {claim_name} is not bound to a hostPath or local PV"
                )
            volumes[name] = Path(source["path"])
            continue
        local.mkdir(parents=True, exist_ok=True)
        for kind, plural, decode in (
            ("configMap", "configmaps", str.encode),
            ("secret", "secrets", base64.b64decode),
        ):
            if kind in volume:
                source_name = volume[kind].get("name") or volume[kind].get("secretName")
                obj = api.get("v1", plural, namespace, source_name) or {}
                for key, value in (obj.get("data") or {}).items():
                    (local / key).write_bytes(decode(value))
        volumes[name] = local
    return volumes


class PodWorker(threading.Thread):
    def __init__(self, api: KubeApi, pod: dict[str, Any], ip: str, root: Path, on_exit) -> None:
        metadata = pod["metadata"]
        super().__init__(name=f"pod-{metadata['namespace']}-{metadata['name']}", daemon=True)
        self.api, self.pod, self.ip, self.on_exit = api, pod, ip, on_exit
        self.directory = root / f"{metadata['namespace']}_{metadata['name']}_{metadata['uid'][:8]}"
        self.init_containers: list[Container] = []
        self.containers: list[Container] = []
        self.init_index = 0
        self.started_at = now_rfc3339()
        self.problem: tuple[str, str] | None = None  # (reason, message) while the pod cannot start
        self.transitions: dict[str, tuple[str, str]] = {}  # condition type -> (status, time)
        self.reported: dict[str, Any] | None = None
        self.delete_after: float | None = None  # grace seconds of a requested deletion
        self.gone = threading.Event()  # the pod was removed from the API: stop now

    @property
    def key(self) -> str:
        return self.pod["metadata"]["uid"]

    def request_delete(self, grace_seconds: float) -> None:
        self.delete_after = (
            grace_seconds if self.delete_after is None else min(self.delete_after, grace_seconds)
        )

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.on_exit(self)

    def _run(self) -> None:
        spec, metadata = self.pod["spec"], self.pod["metadata"]
        self.directory.mkdir(parents=True, exist_ok=True)
        volumes = None
        while volumes is None and not self.gone.is_set() and self.delete_after is None:
            try:
                volumes = local_volumes(self.api, self.pod, self.directory)
            except VolumeError as error:
                self.problem = ("ContainerCreating", str(error))
                self._report()
                time.sleep(1)
        if volumes is None:
            self._finish()
            return
        ctx = PodContext(
            metadata["name"],
            metadata["namespace"],
            metadata["uid"],
            spec["nodeName"],
            self.ip,
            self.directory,
            volumes,
        )
        images = [c.get("image", "") for c in spec.get("initContainers", []) + spec["containers"]]
        foreign = [image for image in images if not is_kvpilot_image(image)]
        if foreign:
            self.problem = (
                "ErrImageNeverPull",
                f"the process kubelet runs kvpilot images only, not {foreign}",
            )
        policy = spec.get("restartPolicy", "Always")
        # A failed init container is retried unless the pod never restarts (a Job's pod): then it fails.
        init_policy = "Never" if policy == "Never" else "OnFailure"
        self.init_containers = [Container(c, ctx, init_policy) for c in spec.get("initContainers", [])]
        self.containers = [Container(c, ctx, policy) for c in spec["containers"]]
        while not self.gone.is_set():
            if self.delete_after is not None:
                self._terminate(self.delete_after)
                break
            if not self.problem:
                self._step(time.monotonic())
            self._report()
            time.sleep(TICK_SECONDS)
        self._finish()

    @property
    def init_failed(self) -> bool:
        return any(c.finished and (c.last_termination or {}).get("exitCode") for c in self.init_containers)

    def _step(self, now: float) -> None:
        while self.init_index < len(self.init_containers):
            init = self.init_containers[self.init_index]
            init.step(now)
            if not init.finished or self.init_failed:
                return
            self.init_index += 1
        for container in self.containers:
            container.step(now)

    def _terminate(self, grace: float) -> None:
        """preStop hooks, then SIGTERM, then SIGKILL once the grace period is over."""
        deadline = time.monotonic() + grace
        running = [c for c in self.init_containers + self.containers if c.process is not None]
        hooks = []
        for container in running:
            pre_stop = ((container.spec.get("lifecycle") or {}).get("preStop") or {}).get("exec")
            if pre_stop:
                hook = threading.Thread(
                    target=self._run_hook, args=(container, pre_stop["command"], deadline)
                )
                hook.start()
                hooks.append(hook)
        for hook in hooks:
            hook.join(max(deadline - time.monotonic(), 0))
        for container in running:
            container.signal(signal.SIGTERM)
        for container in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                container.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for container in running:
            container.signal(signal.SIGKILL)
            if container.process is not None:
                container.process.wait()

    def _run_hook(self, container: Container, command: list[str], deadline: float) -> None:
        argv = container_argv({**container.spec, "command": command, "args": []}, container.ctx)
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(argv, timeout=max(deadline - time.monotonic(), 0.1), capture_output=True)

    def _finish(self) -> None:
        for container in self.init_containers + self.containers:
            container.signal(signal.SIGKILL)
        if not self.gone.is_set():
            metadata = self.pod["metadata"]
            # The kubelet completes a graceful deletion once the containers are gone.
            with contextlib.suppress(ApiError, httpx.HTTPError):
                self.api.delete(
                    "v1", "pods", metadata["namespace"], metadata["name"],
                    gracePeriodSeconds=0, preconditions={"uid": metadata["uid"]},
                )  # fmt: skip
        shutil.rmtree(self.directory / "volumes", ignore_errors=True)

    # --- status --------------------------------------------------------------------------------

    def _condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        status = "True" if ok else "False"
        previous = self.transitions.get(kind)
        if previous is None or previous[0] != status:
            self.transitions[kind] = (status, now_rfc3339())
        condition = {"type": kind, "status": status, "lastTransitionTime": self.transitions[kind][1]}
        if not ok and reason:
            condition.update(reason=reason, message=message)
        return condition

    def status(self) -> dict[str, Any]:
        containers = [c.status() for c in self.containers]
        if self.problem and not containers:
            containers = [
                {
                    "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                    "restartCount": 0, "started": False,
                    "state": {"waiting": {"reason": self.problem[0], "message": self.problem[1]}},
                }
                for c in self.pod["spec"]["containers"]
            ]  # fmt: skip
        elif self.problem:
            for status in containers:
                status["state"] = {"waiting": {"reason": self.problem[0], "message": self.problem[1]}}
        unready = [c["name"] for c in containers if not c["ready"]]
        initialized = self.init_index >= len(self.init_containers)
        ever_ran = any(c.started_at for c in self.containers)
        phase = "Running" if ever_ran else "Pending"
        if self.containers and all(c.finished for c in self.containers):
            failed = any((c.last_termination or {}).get("exitCode") for c in self.containers)
            phase = "Failed" if failed else "Succeeded"
        if self.init_failed:
            phase = "Failed"
        message = f"containers with unready status: [{' '.join(unready)}]"
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.started_at,
            "conditions": [
                self._condition("PodReadyToStartContainers", not self.problem),
                self._condition(
                    "Initialized", initialized, "ContainersNotInitialized", "init containers pending"
                ),
                self._condition("ContainersReady", not unready, "ContainersNotReady", message),
                self._condition("Ready", not unready, "ContainersNotReady", message),
            ],
            "containerStatuses": containers,
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        return status

    def _report(self) -> None:
        status = self.status()
        if status == self.reported:
            return
        metadata = self.pod["metadata"]
        try:
            self.api.patch(
                "v1", "pods", metadata["namespace"], metadata["name"], {"status": status},
                sub="status", kind="strategic",
            )  # fmt: skip
            self.reported = status
        except ApiError as error:
            if error.status_code == 404:
                self.gone.set()
        except httpx.HTTPError:
            pass  # the API server is away for a moment: report again on the next tick
