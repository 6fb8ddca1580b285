"""The local control plane itself: it comes up, serves, and leaves no process behind."""

import socket
import subprocess
from pathlib import Path

from tests.cluster import controlplane
from tests.cluster.build import COMMANDS, bin_dir, staging_version, wrapper_go_mod
from tests.cluster.controlplane import ControlPlane, stop_recorded
from tests.cluster.kubeapi import KubeApi
from tests.cluster.processes import pid_alive
from tests.cluster.tools import find_kubectl, free_port


def test_wrapper_module_replaces_every_staging_module_with_its_release():
    go_mod = wrapper_go_mod("v1.36.5")
    assert staging_version("v1.36.5") == "v0.36.5"
    assert "require k8s.io/kubernetes v1.36.5" in go_mod
    assert "\tk8s.io/api => k8s.io/api v0.36.5" in go_mod
    assert "\tk8s.io/kube-scheduler => k8s.io/kube-scheduler v0.36.5" in go_mod


def test_binaries_are_cached_where_other_tools_find_them(control_plane, monkeypatch):
    for name in COMMANDS:
        assert (bin_dir(control_plane.version) / name).is_file()
    monkeypatch.delenv("KVPILOT_K8S_CACHE", raising=False)
    assert bin_dir("v1.36.5") == Path.home() / ".cache" / "kvpilot" / "k8s" / "v1.36.5" / "bin"


def test_up_serves_then_down_leaves_no_process(tmp_path):
    plane = ControlPlane(tmp_path / "plane")
    with plane:
        pids = plane.pids()
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
        assert all(pid_alive(pid) for pid in pids.values())
        api = KubeApi(plane.kubeconfig)
        assert api.request("GET", "/version")["gitVersion"] == plane.version
        assert {ns["metadata"]["name"] for ns in api.list("v1", "namespaces")} >= {"default", "kube-system"}
        kubectl = subprocess.run(
            [str(find_kubectl()), "--kubeconfig", str(plane.kubeconfig), "get", "namespaces", "-o", "name"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "namespace/kube-node-lease" in kubectl.stdout, kubectl.stderr
        api.close()
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    assert stop_recorded(tmp_path / "plane") == []  # nothing left for `down` either


def test_a_port_taken_before_the_api_server_binds_it_is_retried_on_new_ports(tmp_path, monkeypatch):
    """free_port() only finds a port free for now; another socket can take it before
    kube-apiserver binds it ("address already in use"): the plane starts again on new ports."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(controlplane, "free_port", lambda: next(ports, None) or free_port())
    plane = ControlPlane(tmp_path / "plane")
    try:
        with plane:
            assert plane.api_port != taken.getsockname()[1]
            assert KubeApi(plane.kubeconfig).request("GET", "/version")["gitVersion"] == plane.version
    finally:
        taken.close()
    assert not any(pid_alive(pid) for pid in plane.pids().values())
