"""Build kube-apiserver, kube-controller-manager and kube-scheduler from the Go module proxy, once.

A generated wrapper module requires k8s.io/kubernetes at KUBERNETES_VERSION and replaces each staging
module (`k8s.io/api => ./staging/src/k8s.io/api` in its go.mod) with the matching v0.X.Y release; a
plain `go build` of the commands then works. The binaries land in
~/.cache/kvpilot/k8s/<version>/bin/ where later runs, CI on the same machine and other tools find them.
A file lock makes concurrent callers (two pytest processes, `make cluster`) build once.

Standard library only: `python -m tests.cluster.build` works before the venv exists.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

KUBERNETES_VERSION = "v1.36.5"
COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
# Go 1.27 builds a kube-openapi that serves a broken /openapi/v2 (503): every `kubectl apply` fails.
GO_SERIES = "go1.26"
STAGING_MODULES = (
    "api", "apiextensions-apiserver", "apimachinery", "apiserver", "cli-runtime", "client-go",
    "cloud-provider", "cluster-bootstrap", "code-generator", "component-base", "component-helpers",
    "controller-manager", "cri-api", "cri-client", "cri-streaming", "csi-translation-lib",
    "dynamic-resource-allocation", "endpointslice", "externaljwt", "kms", "kube-aggregator",
    "kube-controller-manager", "kube-proxy", "kube-scheduler", "kubectl", "kubelet", "metrics",
    "mount-utils", "pod-security-admission", "sample-apiserver", "sample-cli-plugin",
    "sample-controller", "streaming",
)  # fmt: skip


class BuildError(RuntimeError):
    pass


def cache_dir(version: str = KUBERNETES_VERSION) -> Path:
    root = os.environ.get("KVPILOT_K8S_CACHE") or Path.home() / ".cache" / "kvpilot" / "k8s"
    return Path(root) / version


def bin_dir(version: str = KUBERNETES_VERSION) -> Path:
    return cache_dir(version) / "bin"


def staging_version(version: str) -> str:
    """v1.36.5 -> v0.36.5: the release tag of every staging module cut with that Kubernetes release."""
    major_minor_patch = re.fullmatch(r"v1\.(\d+)\.(\d+)", version)
    if not major_minor_patch:
        raise BuildError(f"not a Kubernetes release version: {version}")
    minor, patch = major_minor_patch.groups()
    return f"v0.{minor}.{patch}"


def wrapper_go_mod(version: str) -> str:
    staging = staging_version(version)
    replaces = "\n".join(f"\tk8s.io/{name} => k8s.io/{name} {staging}" for name in STAGING_MODULES)
    return (
        "module kvpilot.dev/k8s-binaries\n\n"
        "go 1.26.0\n\n"
        "godebug default=go1.26\n\n"
        f"require k8s.io/kubernetes {version}\n\n"
        f"replace (\n{replaces}\n)\n"
    )


def find_go() -> str:
    candidates = [os.environ.get("KVPILOT_GO"), "/usr/local/go/bin/go", shutil.which("go")]
    for candidate in filter(None, candidates):
        if not Path(candidate).is_file():
            continue
        version = subprocess.run([candidate, "env", "GOVERSION"], capture_output=True, text=True).stdout
        if version.strip() == GO_SERIES or version.startswith(GO_SERIES + "."):
            return candidate
    raise BuildError(
        f"building Kubernetes {KUBERNETES_VERSION} needs Go {GO_SERIES} (not 1.27: its kube-openapi breaks "
        f"/openapi/v2); none found among {candidates}. Install it or point KVPILOT_GO at it."
    )


def ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    values = {"gitVersion": version, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"}
    flags = [
        f"-X {package}.{key}={value}"
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, value in values.items()
    ]
    return " ".join(["-s", "-w", *flags])


def binaries_present(version: str = KUBERNETES_VERSION) -> bool:
    return all((bin_dir(version) / name).is_file() for name in COMMANDS)


def ensure_binaries(version: str = KUBERNETES_VERSION, log=None) -> Path:
    """Return the bin directory holding the three binaries, building the missing ones first."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    target = bin_dir(version)
    if binaries_present(version):
        return target
    cache_dir(version).mkdir(parents=True, exist_ok=True)
    with open(cache_dir(version) / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits here, then finds the binaries
        _build_missing(version, log)
    return target


def _build_missing(version: str, log) -> None:
    go = find_go()
    source = cache_dir(version) / "src"
    source.mkdir(parents=True, exist_ok=True)
    (source / "go.mod").write_text(wrapper_go_mod(version))
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-mod=mod",  # lets `go build` fill go.sum for the wrapper module
    }
    bin_dir(version).mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        output = bin_dir(version) / name
        if output.is_file():
            continue
        log(f"building {name} {version} with {go} (first use on this machine: minutes) ...")
        started = time.monotonic()
        partial = output.with_suffix(".partial")
        command = [go, "build", "-trimpath", "-ldflags", ldflags(version), "-o", str(partial)]
        result = subprocess.run(
            [*command, f"k8s.io/kubernetes/cmd/{name}"], cwd=source, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise BuildError(f"go build {name} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        partial.rename(output)
        log(f"built {name} in {time.monotonic() - started:.0f} s -> {output}")


def main() -> int:
    try:
        print(ensure_binaries())
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
