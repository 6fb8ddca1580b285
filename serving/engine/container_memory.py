"""The container's memory limit and working set, read from its cgroup (v2 or v1): what a CPU
server's KV cache must fit (kv_cache_sizing.HostMemory).

The working set is what the kubelet and `kubectl top` call a container's memory: the cgroup's
charge minus its inactive file cache (which the kernel reclaims before it OOM-kills anything).
"""

from dataclasses import dataclass
from pathlib import Path

from kvpilot.serving.engine.kv_cache_sizing import HostMemory

CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
NO_LIMIT = 1 << 60  # cgroup v1 spells "no limit" as a page-rounded 2^63 - 1


@dataclass(frozen=True)
class CgroupFiles:
    """One cgroup version's file names for the limit, the charge and the inactive file cache."""

    limit: str
    usage: str
    inactive_file: str  # the key in memory.stat


V2 = CgroupFiles("memory.max", "memory.current", "inactive_file")
V1 = CgroupFiles("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def host_memory() -> HostMemory | None:
    """This process's container; None where it has no memory limit (or no cgroup filesystem)."""
    return read_host_memory(CGROUP, PROC_CGROUP)


def read_host_memory(cgroup: Path, membership: Path) -> HostMemory | None:
    """The process's own group from `membership` (/proc/self/cgroup: `0::/path` for v2,
    `N:memory:/path` for v1; `/` inside a container's cgroup namespace), then v1's root (a
    container without a cgroup namespace sees its own group there)."""
    groups = _own_groups(membership)
    candidates = []
    if "" in groups:
        candidates.append((cgroup / groups[""], V2))
    if "memory" in groups:
        candidates.append((cgroup / "memory" / groups["memory"], V1))
    candidates.append((cgroup / "memory", V1))
    for directory, files in candidates:
        try:
            text = (directory / files.limit).read_text().strip()
        except OSError:
            continue
        limit = None if text == "max" else int(text)
        if limit is None or limit >= NO_LIMIT:
            return None
        return HostMemory(limit=limit, used=_working_set(directory, files))
    return None


def _working_set(directory: Path, files: CgroupFiles) -> int:
    usage = int((directory / files.usage).read_text())
    stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
    return max(usage - int(stat.get(files.inactive_file, 0)), 0)


def _own_groups(membership: Path) -> dict[str, str]:
    """Controllers ("" for v2's unified hierarchy) to the process's group, relative."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return {}
    groups = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            groups[controller] = path.lstrip("/")
    return groups
