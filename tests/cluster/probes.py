"""Probes of a process-kubelet container: httpGet, tcpSocket and exec, with the kubelet's thresholds."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from typing import Any

import httpx

from tests.cluster.podspec import PodContext, mounts_of, program, rewrite_path


def run_probe(probe: dict[str, Any], container: dict[str, Any], ctx: PodContext) -> bool:
    timeout = probe.get("timeoutSeconds", 1)
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    if "httpGet" in probe:
        action = probe["httpGet"]
        port = ports.get(action["port"], action["port"])
        url = f"{action.get('scheme', 'HTTP').lower()}://{ctx.ip}:{port}{action.get('path', '/')}"
        try:
            return 200 <= httpx.get(url, timeout=timeout, verify=False).status_code < 400
        except httpx.HTTPError:
            return False
    if "tcpSocket" in probe:
        port = ports.get(probe["tcpSocket"]["port"], probe["tcpSocket"]["port"])
        try:
            socket.create_connection((ctx.ip, int(port)), timeout=timeout).close()
        except OSError:
            return False
        return True
    if "exec" in probe:
        command = [rewrite_path(a, mounts_of(container, ctx)) for a in probe["exec"]["command"]]
        try:
            return subprocess.run(program(command), capture_output=True, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False
    return False


@dataclass
class Probe:
    spec: dict[str, Any]
    next_at: float
    successes: int = 0
    failures: int = 0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, now: float) -> None:
        self.next_at = now + self.spec.get("periodSeconds", 10)
        self.successes, self.failures = (self.successes + 1, 0) if ok else (0, self.failures + 1)

    @property
    def failed(self) -> bool:
        return self.failures >= self.spec.get("failureThreshold", 3)

    @property
    def succeeded(self) -> bool:
        return self.successes >= self.spec.get("successThreshold", 1)
