"""One container of a process-kubelet pod: a local process (podspec.py says which), restarted with
back-off, probed like the kubelet probes a container (probes.py), reported as a ContainerStatus.
With `resources.limits.memory` it runs in a memory cgroup of that size where the machine allows
one (cgroups.py), and a kill by the kernel's OOM killer there is reported as `OOMKilled`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.utils import parse_quantity

from tests.cluster.cgroups import ENABLED as MEMORY_LIMITS
from tests.cluster.cgroups import MemoryCgroup
from tests.cluster.nodes import now_rfc3339
from tests.cluster.podspec import PodContext, container_argv, container_env
from tests.cluster.probes import Probe, run_probe

BACKOFF_START_SECONDS = float(os.environ.get("KVPILOT_KUBELET_BACKOFF_SECONDS", "10"))
BACKOFF_MAX_SECONDS = 300
BACKOFF_RESET_SECONDS = 600  # a container that ran this long starts its back-off afresh
TERMINATION_MESSAGE_BYTES, TERMINATION_MESSAGE_LINES = 2048, 80  # FallbackToLogsOnError's limits


@dataclass
class Container:
    spec: dict[str, Any]
    ctx: PodContext
    restart_policy: str = "Always"
    process: subprocess.Popen | None = None
    started_at: str | None = None
    started_monotonic: float = 0.0
    log_offset: int = 0
    restart_count: int = 0
    consecutive_failures: int = 0
    backoff_until: float = 0.0
    last_termination: dict[str, Any] | None = None
    finished: bool = False  # exited and will not restart (restartPolicy Never / OnFailure + success)
    started: bool = False  # the startup probe passed
    ready: bool = False
    probes: dict[str, Probe] = field(default_factory=dict)
    cgroup: MemoryCgroup | None = None  # while a memory-limited process runs

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def memory_limit(self) -> int | None:
        limit = ((self.spec.get("resources") or {}).get("limits") or {}).get("memory")
        return None if limit is None else int(parse_quantity(limit))

    @property
    def log(self) -> Path:
        return self.ctx.directory / "logs" / f"{self.name}.log"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        limit = self.memory_limit if MEMORY_LIMITS else None
        name = f"kvpilot-kubelet/{self.ctx.uid}-{self.name}-{self.restart_count}"
        self.cgroup = None if limit is None else MemoryCgroup.create(name, limit)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                container_argv(self.spec, self.ctx),
                cwd=self.ctx.directory,
                env=container_env(self.spec, self.ctx),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals reach its children too
                preexec_fn=self.cgroup.enter if self.cgroup else None,
            )
        now = time.monotonic()
        self.started_at, self.started_monotonic = now_rfc3339(), now
        self.started, self.ready = "startupProbe" not in self.spec, False
        self.probes = {
            kind: Probe(self.spec[kind], now + self.spec[kind].get("initialDelaySeconds", 0))
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
            if kind in self.spec
        }

    def termination_message(self, exit_code: int) -> str:
        if exit_code == 0 or not self.log.exists():
            return ""
        with open(self.log, "rb") as log:
            log.seek(self.log_offset)
            text = log.read().decode(errors="replace")
        tail = "\n".join(text.rstrip("\n").splitlines()[-TERMINATION_MESSAGE_LINES:])
        return tail.encode()[-TERMINATION_MESSAGE_BYTES:].decode(errors="replace")

    def step(self, now: float) -> None:
        """Advance one tick: notice an exit, restart after back-off, run the probes that are due."""
        if self.process is None:
            if not self.finished and now >= self.backoff_until:
                self.restart_count += self.last_termination is not None
                self.start()
            return
        exit_code = self.process.poll()
        if exit_code is not None:
            self._exited(exit_code, now)
            return
        self._probe(now)

    def _exited(self, exit_code: int, now: float) -> None:
        code = 128 - exit_code if exit_code < 0 else exit_code  # killed by a signal: 128 + signal
        oom_killed = self.cgroup is not None and self.cgroup.oom_kills() > 0
        self._drop_cgroup()
        self.last_termination = {
            "exitCode": code,
            "reason": "OOMKilled" if oom_killed else "Completed" if code == 0 else "Error",
            "message": self.termination_message(code),
            "startedAt": self.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": f"process://{self.process.pid}",
        }
        if not self.last_termination["message"]:
            del self.last_termination["message"]
        self.process, self.ready, self.started = None, False, False
        if self.restart_policy == "Never" or (self.restart_policy == "OnFailure" and code == 0):
            self.finished = True
            return
        if now - self.started_monotonic >= BACKOFF_RESET_SECONDS:
            self.consecutive_failures = 0
        self.consecutive_failures += 1
        self.backoff_until = now + self.backoff_seconds

    def release(self) -> None:
        """At the pod's end, once its process is killed: its memory cgroup goes too."""
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self._drop_cgroup()

    def _drop_cgroup(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None

    @property
    def backoff_seconds(self) -> float:
        return min(BACKOFF_START_SECONDS * 2 ** max(self.consecutive_failures - 1, 0), BACKOFF_MAX_SECONDS)

    def _probe(self, now: float) -> None:
        startup = self.probes.get("startupProbe")
        if not self.started:
            if startup and startup.due(now):
                startup.record(run_probe(startup.spec, self.spec, self.ctx), now)
                if startup.succeeded:
                    self.started = True
                elif startup.failed:
                    self.kill(reason="startup probe failed")
            return
        liveness = self.probes.get("livenessProbe")
        if liveness and liveness.due(now):
            liveness.record(run_probe(liveness.spec, self.spec, self.ctx), now)
            if liveness.failed:
                self.kill(reason="liveness probe failed")
                return
        readiness = self.probes.get("readinessProbe")
        if readiness is None:
            self.ready = True
        elif readiness.due(now):
            readiness.record(run_probe(readiness.spec, self.spec, self.ctx), now)
            if readiness.succeeded:
                self.ready = True
            elif readiness.failed:
                self.ready = False

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def kill(self, reason: str, grace: float = 10) -> None:
        """Stop the process (SIGTERM, then SIGKILL after `grace`); step() then restarts it."""
        if self.process is None:
            return
        with open(self.log, "ab") as log:
            log.write(f"process kubelet: killing container {self.name}: {reason}\n".encode())
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait()

    def status(self) -> dict[str, Any]:
        if self.process is not None:
            state = {"running": {"startedAt": self.started_at}}
        elif self.finished and self.last_termination:
            state = {"terminated": self.last_termination}
        elif self.last_termination:
            message = f"back-off {self.backoff_seconds:.0f}s restarting failed container={self.name} "
            message += f"pod={self.ctx.name}_{self.ctx.namespace}({self.ctx.uid})"
            state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": f"process://{self.spec.get('image', '')}",
            "ready": self.ready,
            "started": self.process is not None and self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_termination} if self.last_termination else {},
        }
        if self.process is not None:
            status["containerID"] = f"process://{self.process.pid}"
        return status
