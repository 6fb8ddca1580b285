"""Memory cgroups for test processes, where this machine lets us make them (root, with cgroup v1's
memory hierarchy or a v2 root that delegates memory): the process kubelet puts a container with
`resources.limits.memory` in one, as a real kubelet does, and reports `OOMKilled` when the kernel
kills it there. Elsewhere `MemoryCgroup.create` returns None and processes run unlimited.
KVPILOT_KUBELET_MEMORY_LIMITS=0 turns the kubelet's use off.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
ENABLED = os.environ.get("KVPILOT_KUBELET_MEMORY_LIMITS", "1") != "0"


def _writable_root() -> tuple[Path, str, str] | None:
    """(folder for new groups, limit file, the file whose `oom_kill` line counts kills)."""
    v1 = CGROUP / "memory"
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return v1, "memory.limit_in_bytes", "memory.oom_control"
    controllers = CGROUP / "cgroup.subtree_control"
    if controllers.exists() and "memory" in controllers.read_text().split() and os.access(CGROUP, os.W_OK):
        return CGROUP, "memory.max", "memory.events"
    return None


@dataclass(frozen=True)
class MemoryCgroup:
    path: Path
    events: str

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> MemoryCgroup | None:
        """A new group under this machine's memory hierarchy, or None where none can be made."""
        root = _writable_root()
        if root is None:
            return None
        parent, limit_file, events = root
        path = parent / name
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / limit_file).write_text(str(limit_bytes))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return cls(path, events)

    def enter(self) -> None:
        """Moves the calling process in (a child's preexec_fn calls it before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        """How many processes the kernel killed here for want of memory."""
        try:
            lines = (self.path / self.events).read_text().splitlines()
        except OSError:
            return 0
        return next((int(line.split()[1]) for line in lines if line.startswith("oom_kill ")), 0)

    def remove(self) -> None:
        """Removes the group once its processes are gone (they leave it a moment after exiting)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def memory_cgroups_available() -> bool:
    """Whether a memory cgroup can be made here (one is made and removed)."""
    probe = MemoryCgroup.create(f"kvpilot-kubelet/probe-{os.getpid()}-{time.monotonic_ns()}", 64 << 20)
    if probe is not None:
        probe.remove()
    return probe is not None
