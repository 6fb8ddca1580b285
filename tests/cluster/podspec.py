"""How a container of a pod maps to a local process (the process kubelet's "image" and "runtime").

The kvpilot image's programs map to this machine's: `kvpilot` -> `python -m kvpilot.serving.cli`,
`python` -> this interpreter, `hf` -> this virtualenv's; anything else runs from PATH (`sleep` in
a preStop hook). Paths under a volumeMount are rewritten to the volume's local directory (in args,
env values and the text of ConfigMap files), and `--host` to the pod's address. The image's
compiled native kernels are this node's: kvpilot containers share the machine's kernel cache
(XDG_CACHE_HOME), so a pod start does not recompile them (~6 s of CPU on 2 cores; compiling is
tested in tests/kernels).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NODE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "OMP_NUM_THREADS", "VIRTUAL_ENV", "TZ")


def is_kvpilot_image(image: str) -> bool:
    """ghcr.io/kvpilot/kvpilot:0.1.0, kvpilot:dev, ...@sha256:... -> True."""
    repository = image.split("@")[0]
    last = repository.rsplit("/", 1)[-1]
    return last.split(":")[0] == "kvpilot"


def program(argv: list[str]) -> list[str]:
    head, rest = argv[0], argv[1:]
    if head == "kvpilot":
        return [sys.executable, "-m", "kvpilot.serving.cli", *rest]
    if head in ("python", "python3"):
        return [sys.executable, *rest]
    beside = Path(sys.executable).parent / head  # the image's other Python tools (`hf`): this venv's
    if "/" not in head and beside.exists():
        return [str(beside), *rest]
    return argv


@dataclass(frozen=True)
class PodContext:
    """What a pod's processes see: its address, its directory, its volumes' local directories."""

    name: str
    namespace: str
    uid: str
    node_name: str
    ip: str
    directory: Path
    volumes: dict[str, Path]
    env_refs: dict[tuple[str, str, str], str] = field(default_factory=dict)  # secretKeyRef values, ...


def mounts_of(container: dict[str, Any], ctx: PodContext) -> list[tuple[str, str]]:
    mounts = []
    for mount in container.get("volumeMounts") or []:
        local = ctx.volumes[mount["name"]] / mount.get("subPath", "")
        mounts.append((mount["mountPath"].rstrip("/") or "/", str(local).rstrip("/")))
    return sorted(mounts, key=lambda m: -len(m[0]))


def rewrite_path(value: str, mounts: list[tuple[str, str]]) -> str:
    flag, equals, rest = value.partition("=")
    if equals and flag.startswith("-"):
        return f"{flag}={rewrite_path(rest, mounts)}"
    for mount_path, local in mounts:
        if value == mount_path or value.startswith(mount_path + "/"):
            return local + value[len(mount_path) :]
    return value


def rewrite_paths_in_text(text: str, mounts: list[tuple[str, str]]) -> str:
    """Every `MOUNTPATH/...` in a file's text, as the pod would see it, to the local directory
    (one pass, longest mountPath first, so a rewritten path is never rewritten again)."""
    local_of = {mount_path: local for mount_path, local in mounts if mount_path != "/"}
    if not local_of:
        return text
    alternatives = "|".join(re.escape(path) for path in sorted(local_of, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w/.-])({alternatives})(?=/|\b|$)")
    return pattern.sub(lambda match: local_of[match.group(1)], text)


def container_argv(container: dict[str, Any], ctx: PodContext) -> list[str]:
    mounts = mounts_of(container, ctx)
    argv = [
        rewrite_path(a, mounts) for a in (container.get("command") or ["kvpilot"]) + container.get("args", [])
    ]
    for index, arg in enumerate(argv[:-1]):
        if arg == "--host":  # the pod listens on its own address, not on every address of the machine
            argv[index + 1] = ctx.ip
    return program(argv)


def _field_value(field_path: str, ctx: PodContext) -> str:
    values = {
        "metadata.name": ctx.name,
        "metadata.namespace": ctx.namespace,
        "metadata.uid": ctx.uid,
        "spec.nodeName": ctx.node_name,
        "status.podIP": ctx.ip,
        "status.hostIP": "127.0.0.1",
    }
    return values.get(field_path, "")


def container_env(container: dict[str, Any], ctx: PodContext) -> dict[str, str]:
    mounts = mounts_of(container, ctx)
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.update(HOME=str(ctx.directory), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if is_kvpilot_image(container.get("image", "")):
        env["XDG_CACHE_HOME"] = str(NODE_CACHE)
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = rewrite_path(var["value"], mounts)
        elif "fieldRef" in (var.get("valueFrom") or {}):
            env[var["name"]] = _field_value(var["valueFrom"]["fieldRef"]["fieldPath"], ctx)
        else:
            for kind, ref in (var.get("valueFrom") or {}).items():
                value = ctx.env_refs.get((kind, ref.get("name"), ref.get("key")))
                if value is not None:
                    env[var["name"]] = value
    return env
