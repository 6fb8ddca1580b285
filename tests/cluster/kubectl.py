"""kubectl and helm against a local control plane."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.cluster.tools import find_helm, find_kubectl


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(find_kubectl()), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def apply(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("apply", "--server-side", *args, stdin=stdin, check=check)


def helm(*args: str) -> subprocess.CompletedProcess:
    env = {
        "HELM_CACHE_HOME": "/tmp/helm-cache",
        "HELM_CONFIG_HOME": "/tmp/helm-config",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run([str(find_helm()), *args], capture_output=True, text=True, env=env, timeout=60)
