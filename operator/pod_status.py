"""Why pods wait, read from their status (pure): the scheduler's Unschedulable message, image
pull errors, CrashLoopBackOff with the last termination message (OOMKilled with the container's
memory limit and what to change), a failed download."""

from __future__ import annotations

from typing import Any

IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}
CONTAINER_ERROR_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
MESSAGE_CHARS = 400


def last_line(text: str) -> str:
    """The last non-empty line of a termination message (a log tail with FallbackToLogsOnError)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][-MESSAGE_CHARS:] if lines else ""


def _termination(terminated: dict[str, Any]) -> str:
    message = last_line(terminated.get("message") or "")
    code = terminated.get("exitCode")
    reason = terminated.get("reason") or "Error"
    return f"exit code {code} ({reason}): {message}" if message else f"exit code {code} ({reason})"


def _memory_limit(pod: dict[str, Any], container_name: str) -> str | None:
    spec = pod.get("spec") or {}
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        if container.get("name") == container_name:
            return ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return None


def _container_problem(pod: dict[str, Any], status: dict[str, Any]) -> tuple[str, str] | None:
    waiting = (status.get("state") or {}).get("waiting") or {}
    reason, where = waiting.get("reason"), f"pod {pod['metadata']['name']} container {status.get('name')}"
    if reason in IMAGE_PULL_REASONS:
        return "ImagePullError", f"{where}: {reason}: {waiting.get('message') or status.get('image')}"
    if reason == "CrashLoopBackOff":
        last = (status.get("lastState") or {}).get("terminated") or {}
        if last.get("reason") == "OOMKilled":  # the engine's pods: the limit is spec.resources.memory
            limit = _memory_limit(pod, status.get("name"))
            return "OOMKilled", (  # its last log line says nothing of why: left out
                f"{where} keeps being killed for using more than its memory limit ({limit or 'none set'}), "
                f"last exit code {last.get('exitCode')} (OOMKilled): raise spec.resources.memory, or use "
                "less (spec.engine.quantization, spec.engine.kvCacheMemory, spec.engine.maxNumSeqs)"
            )
        return "CrashLoopBackOff", f"{where} keeps crashing, last {_termination(last)}"
    if reason in CONTAINER_ERROR_REASONS:
        return reason, f"{where}: {waiting.get('message') or reason}"
    return None


def pod_problem(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) naming the first pod that cannot start and why, or None."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        name, status = pod["metadata"]["name"], pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if (condition.get("type"), condition.get("status")) == (
                "PodScheduled",
                "False",
            ) and condition.get("reason") == "Unschedulable":
                return "Unschedulable", f"pod {name} cannot be scheduled: {condition.get('message', '')}"
        containers = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        for container in containers:
            problem = _container_problem(pod, container)
            if problem:
                return problem
    return None


def failed_download(pods: list[dict[str, Any]]) -> str | None:
    """What the newest failed download pod's container said before it exited."""
    newest = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)
    for pod in newest:
        status = pod.get("status") or {}
        for container in (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        ):
            terminated = (container.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode"):
                return f"{container['name']} {_termination(terminated)}"
    return None
