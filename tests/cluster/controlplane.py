"""A local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Every process listens on 127.0.0.1 only, writes its log under <workdir>/logs/ and is stopped by
its PID (SIGTERM, then SIGKILL). The PIDs are also written to <workdir>/pids so that
`python -m tests.cluster down` can clean up after a harness that was killed.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.cluster import pki as pki_module
from tests.cluster.build import KUBERNETES_VERSION, ensure_binaries
from tests.cluster.processes import ManagedProcess, log_tail, pid_alive, stop_pid
from tests.cluster.tools import find_etcd, free_port

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
READY_TIMEOUT_SECONDS = 90
PORT_ATTEMPTS = 3  # starts on fresh ports when a port is taken before its server binds it
AUDITED_USERS = ("kvpilot-operator",)  # the audit log records these clients' requests only


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class ControlPlane:
    """Start with `start()` (or as a context manager); `kubeconfig` then points at it."""

    workdir: Path
    version: str = KUBERNETES_VERSION
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    api_port: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def pki(self) -> pki_module.Pki:
        return pki_module.Pki(self.workdir / "pki")

    @property
    def audit_log(self) -> Path:
        return self.workdir / "logs" / "audit.log"

    def kubeconfig_for(self, user: str) -> Path:
        """A kubeconfig for its own identity (`user`, in system:masters), seen as such in the audit log."""
        path = self.workdir / f"{user}.kubeconfig"
        if not path.exists():
            pki_module.issue_client_certificate(self.pki, user)
            pki_module.write_kubeconfig(self.pki, self.url, path, user=user)
        return path

    def audit_events(self, user: str) -> list[dict]:
        """Every request `user` made (AUDITED_USERS only), oldest first, as audit.k8s.io/v1 Events."""
        if not self.audit_log.exists():
            return []
        text = self.audit_log.read_text()
        complete = text[: text.rfind("\n") + 1]  # the API server may be writing the last line now
        events = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return [e for e in events if e["user"]["username"] == user and e["stage"] == "ResponseComplete"]

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items() if p.pid is not None}

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        binaries = ensure_binaries(self.version)
        self.workdir.mkdir(parents=True, exist_ok=True)
        pki_module.generate(self.pki.directory)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._start_processes(binaries)
                break
            except BaseException as error:
                self.stop()
                if "address already in use" not in str(error) or attempt == PORT_ATTEMPTS:
                    raise
                # A port free_port() found was taken (say as another socket's ephemeral port)
                # before its server bound it: start over on new ports, with a fresh etcd.
                print(f"control plane: {str(error).splitlines()[-1].strip()}; retrying on new ports")
                shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
        self._write_pids()
        print(f"control plane {self.version} ready in {time.monotonic() - started:.1f} s at {self.url}")

    def _start_processes(self, binaries: Path) -> None:
        self.api_port = free_port()
        pki_module.write_kubeconfig(self.pki, self.url, self.kubeconfig)
        self._start_etcd()
        self._start(self._api_server_process(binaries))
        self._wait_ready("kube-apiserver", self._api_server_ready)
        for name in ("kube-controller-manager", "kube-scheduler"):
            port = free_port()
            self._start(self._component_process(binaries / name, port))
            self._wait_ready(name, lambda port=port: self._healthz(port))

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        self._write_pids()

    def stop_api_server(self) -> None:
        """Stop kube-apiserver only (to test clients against an unavailable API)."""
        self.processes["kube-apiserver"].stop()

    def start_api_server(self) -> None:
        """Start kube-apiserver again, on the same port with the same certificates and data."""
        self._start(self._api_server_process(ensure_binaries(self.version)))
        self._wait_ready("kube-apiserver", self._api_server_ready)
        self._write_pids()

    # --- the processes -------------------------------------------------------------------------

    def _start(self, process: ManagedProcess) -> None:
        self.processes[process.name] = process
        process.start()

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        etcd = find_etcd()
        version = subprocess.run([str(etcd), "--version"], capture_output=True, text=True).stdout
        command = [
            str(etcd),
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
        ]
        if "etcd Version: 3.4" not in version:  # 3.5+: a throwaway store need not fsync
            command.append("--unsafe-no-fsync")
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._start(ManagedProcess("etcd", command, self.workdir / "logs" / "etcd.log"))
        self._wait_ready("etcd", lambda: self._get(f"{self.etcd_url}/health") == 200)

    def _api_server_process(self, binaries: Path) -> ManagedProcess:
        pki = self.pki
        command = [
            str(binaries / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-key-file={pki.service_account_public_key}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            # The `kubernetes` Service's Endpoints would carry 127.0.0.1, which Endpoints reject.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--audit-policy-file={self._audit_policy()}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
        ]
        return ManagedProcess("kube-apiserver", command, self.workdir / "logs" / "kube-apiserver.log")

    def _audit_policy(self) -> Path:
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata", "users": list(AUDITED_USERS)}, {"level": "None"}],
        }
        path = self.workdir / "audit-policy.yaml"
        path.write_text(json.dumps(policy))
        return path

    def _component_process(self, binary: Path, port: int) -> ManagedProcess:
        name = binary.name
        kubeconfig = str(self.kubeconfig)
        command = [
            str(binary),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / (name + '-certs')}",
            "--leader-elect=false",
        ]
        if name == "kube-controller-manager":
            command += [
                f"--service-account-private-key-file={self.pki.service_account_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                "--use-service-account-credentials=false",
            ]
        return ManagedProcess(name, command, self.workdir / "logs" / f"{name}.log")

    # --- readiness ---------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def _get(self, url: str, verify: ssl.SSLContext | bool = False) -> int | None:
        try:
            return httpx.get(url, verify=verify, timeout=2).status_code
        except httpx.HTTPError:
            return None

    def _api_server_ready(self) -> bool:
        return self._get(f"{self.url}/readyz", verify=self.ssl_context()) == 200

    def _healthz(self, port: int) -> bool:
        return self._get(f"https://127.0.0.1:{port}/healthz") == 200

    def _wait_ready(self, name: str, ready) -> None:
        process = self.processes[name]
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.exited():
                raise ControlPlaneError(
                    f"{name} exited ({process.popen.returncode}):\n{log_tail(process.log)}"
                )
            if ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} not ready in {READY_TIMEOUT_SECONDS} s:\n{log_tail(process.log)}")

    def _write_pids(self) -> None:
        if self.workdir.exists():
            (self.workdir / "pids").write_text(json.dumps(self.pids(), indent=1))


def stop_recorded(workdir: Path) -> list[int]:
    """Stop the processes a (possibly killed) harness recorded in <workdir>/pids."""
    path = workdir / "pids"
    if not path.exists():
        return []
    stopped = []
    for pid in reversed(list(json.loads(path.read_text()).values())):
        if pid_alive(pid):
            stop_pid(pid)
            stopped.append(pid)
    return stopped
