"""One pod of the process kubelet, run by one thread: volumes, init containers, containers,
status reports, and graceful deletion (preStop, SIGTERM, the grace period, SIGKILL).
"""

from __future__ import annotations

import base64
import contextlib
import os
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
from tests.cluster.podspec import (
    PodContext,
    container_argv,
    is_kvpilot_image,
    mounts_of,
    rewrite_paths_in_text,
)

TICK_SECONDS = 0.2
VOLUME_SYNC_SECONDS = 2.0  # the real kubelet: about a minute; tests would rather not wait


class VolumeError(RuntimeError):
    pass


def _source_files(api: KubeApi, namespace: str, kind: str, source: dict[str, Any]) -> dict[str, bytes]:
    """A configMap or secret volume source as {path: content}, honouring items and optional."""
    plural, decode = ("configmaps", str.encode) if kind == "configMap" else ("secrets", base64.b64decode)
    name = source.get("name") or source.get("secretName")
    obj = api.get("v1", plural, namespace, name)
    if obj is None:
        if source.get("optional"):
            return {}
        raise VolumeError(f'{kind} "{name}" not found')  # the kubelet's FailedMount, retried
    data = {key: decode(value) for key, value in (obj.get("data") or {}).items()}
    data.update({key: base64.b64decode(value) for key, value in (obj.get("binaryData") or {}).items()})
    if not source.get("items"):
        return data
    files = {}
    for item in source["items"]:
        if item["key"] in data:
            files[item["path"]] = data[item["key"]]
        elif not source.get("optional"):
            raise VolumeError(f'{kind} "{name}": no key "{item["key"]}"')
    return files


def volume_files(
    api: KubeApi, namespace: str, volume: dict[str, Any], mounts: list[tuple[str, str]]
) -> dict[str, bytes] | None:
    """The files of a configMap, secret or projected volume (None for other kinds). Paths under
    the pod's mounts inside a ConfigMap's text are rewritten to their local directories, as args
    are: a config file naming /etc/kvpilot/keys/x finds the projected key there."""
    sources = []
    if "configMap" in volume:
        sources = [("configMap", volume["configMap"])]
    elif "secret" in volume:
        sources = [("secret", volume["secret"])]
    elif "projected" in volume:
        sources = [
            (kind, source[kind])
            for source in volume["projected"].get("sources") or []
            for kind in ("configMap", "secret")
            if kind in source
        ]
    else:
        return None
    files: dict[str, bytes] = {}
    for kind, source in sources:
        for path, content in _source_files(api, namespace, kind, source).items():
            if kind == "configMap":
                with contextlib.suppress(UnicodeDecodeError):
                    content = rewrite_paths_in_text(content.decode(), mounts).encode()
            files[path] = content
    return files


def write_volume(local: Path, files: dict[str, bytes]) -> bool:
    """Write what changed, each file replaced atomically (a reader never sees half a file)."""
    changed = False
    for path, content in files.items():
        target = local / path
        if target.exists() and target.read_bytes() == content:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp")
        staging.write_bytes(content)
        os.replace(staging, target)
        changed = True
    return changed


def pod_mounts(pod: dict[str, Any], volumes: dict[str, Path]) -> list[tuple[str, str]]:
    """(mountPath, local directory) of every container's mounts, longest mountPath first."""
    ctx = PodContext("", "", "", "", "", Path(), volumes)
    containers = (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]
    return sorted({m for c in containers for m in mounts_of(c, ctx)}, key=lambda m: -len(m[0]))


def env_references(api: KubeApi, pod: dict[str, Any]) -> dict[tuple[str, str, str], str]:
    """The values of the containers' secretKeyRef / configMapKeyRef env, by (kind, name, key)."""
    namespace, values = pod["metadata"]["namespace"], {}
    containers = (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]
    for var in (var for c in containers for var in c.get("env") or []):
        for kind in ("secretKeyRef", "configMapKeyRef"):
            ref = (var.get("valueFrom") or {}).get(kind)
            if ref is None:
                continue
            source = {"name": ref["name"], "items": [{"key": ref["key"], "path": "value"}]}
            files = _source_files(
                api, namespace, kind.removesuffix("KeyRef"), source | {"optional": ref.get("optional")}
            )
            if "value" in files:
                values[kind, ref["name"], ref["key"]] = files["value"].decode()
    return values


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
        volumes[name] = local
    sync_volumes(api, pod, volumes)
    return volumes


def sync_volumes(api: KubeApi, pod: dict[str, Any], volumes: dict[str, Path]) -> None:
    """(Re)write the configMap, secret and projected volumes from the API, as the kubelet's
    periodic sync does: a changed ConfigMap reaches a running pod's files."""
    mounts = pod_mounts(pod, volumes)
    for volume in pod["spec"].get("volumes") or []:
        files = volume_files(api, pod["metadata"]["namespace"], volume, mounts)
        if files is not None:
            write_volume(volumes[volume["name"]], files)


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
        volumes, env_refs = None, None
        while env_refs is None and not self.gone.is_set() and self.delete_after is None:
            try:
                volumes = volumes or local_volumes(self.api, self.pod, self.directory)
            except VolumeError as error:
                self.problem = ("ContainerCreating", str(error))
            else:
                try:
                    env_refs = env_references(self.api, self.pod)
                except VolumeError as error:
                    self.problem = ("CreateContainerConfigError", str(error))
            if env_refs is None:
                self._report()
                time.sleep(1)
        if volumes is None or env_refs is None:
            self._finish()
            return
        self.problem = None  # the volumes and the env's references are there now
        ctx = PodContext(
            metadata["name"],
            metadata["namespace"],
            metadata["uid"],
            spec["nodeName"],
            self.ip,
            self.directory,
            volumes,
            env_refs,
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
        synced = time.monotonic()
        while not self.gone.is_set():
            if self.delete_after is not None:
                self._terminate(self.delete_after)
                break
            if not self.problem:
                self._step(time.monotonic())
            if time.monotonic() - synced >= VOLUME_SYNC_SECONDS:
                synced = time.monotonic()
                with contextlib.suppress(VolumeError, ApiError, httpx.HTTPError):
                    sync_volumes(self.api, self.pod, volumes)  # a failed sync keeps the last files
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
        for container in self.init_containers + self.containers:
            container.release()
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
