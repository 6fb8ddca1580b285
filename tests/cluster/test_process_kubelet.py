"""The process kubelet with the real scheduler and controllers: pods run, crash, stay unscheduled."""

import os
import signal
import uuid

import httpx
import pytest

from tests.cluster.cgroups import memory_cgroups_available
from tests.cluster.controlplane import ControlPlane
from tests.cluster.harness import ProcessKubeletRunner, condition, wait_for
from tests.cluster.processes import pid_alive

IMAGE = "ghcr.io/kvpilot/kvpilot:0.1.0"
# Serves 200 on every path at $POD_IP:8000 and notes SIGTERM in its log before exiting.
SERVER = """
import http.server, os, signal, sys
def stop(*_):
    print("got SIGTERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(os.environ["POD_NAME"].encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer((os.environ["POD_IP"], 8000), Ok).serve_forever()
"""


def pod(name: str, command: list[str], **spec) -> dict:
    container = {
        "name": "main",
        "image": IMAGE,
        "command": command,
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": [{"name": "http", "containerPort": 8000}],
        **spec.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"automountServiceAccountToken": False, "containers": [container], **spec},
    }


@pytest.fixture
def namespace(cluster):
    name = f"kubelet-{uuid.uuid4().hex[:6]}"
    cluster.api.create("v1", "namespaces", None, {"metadata": {"name": name}})
    yield name
    cluster.api.delete("v1", "namespaces", None, name)


def container_status(api, namespace: str, name: str) -> dict:
    statuses = ((api.get("v1", "pods", namespace, name) or {}).get("status") or {}).get("containerStatuses")
    return (statuses or [{}])[0]


def test_a_pod_runs_on_its_address_becomes_ready_and_stops_gracefully(cluster, namespace):
    api = cluster.api
    probe = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1}
    api.create(
        "v1", "pods", namespace, pod("web", ["python", "-c", SERVER], container={"readinessProbe": probe})
    )
    ready = wait_for(
        lambda: condition(api.get("v1", "pods", namespace, "web"), "Ready").get("status") == "True",
        "the pod to be Ready",
    )
    assert ready
    running = api.get("v1", "pods", namespace, "web")
    assert running["spec"]["nodeName"] in cluster.node_names  # placed by the real scheduler
    address = running["status"]["podIP"]
    assert not address.startswith("127.")
    assert httpx.get(f"http://{address}:8000/", timeout=5).text == "web"
    pid = int(running["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
    assert pid_alive(pid)

    api.delete("v1", "pods", namespace, "web", gracePeriodSeconds=5)
    wait_for(lambda: api.get("v1", "pods", namespace, "web") is None, "the pod to be gone")
    assert not pid_alive(pid)
    assert "got SIGTERM" in cluster.pod_logs(namespace, "web", "main")


def test_a_crashing_pod_shows_crash_loop_back_off_with_its_message(cluster, namespace):
    crash = [
        "python",
        "-c",
        "import sys; print('cannot load the model: no such file', file=sys.stderr); sys.exit(3)",
    ]
    cluster.api.create("v1", "pods", namespace, pod("crash", crash))
    status = wait_for(
        lambda: (
            (
                container_status(cluster.api, namespace, "crash")
                .get("state", {})
                .get("waiting", {})
                .get("reason")
                == "CrashLoopBackOff"
            )
            and container_status(cluster.api, namespace, "crash")
        ),
        "CrashLoopBackOff",
    )
    terminated = status["lastState"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    assert "cannot load the model: no such file" in terminated["message"]
    assert "back-off" in status["state"]["waiting"]["message"]
    # After the back-off (10 s, then doubling) the kubelet restarts it and counts the restart.
    restarted = wait_for(
        lambda: container_status(cluster.api, namespace, "crash").get("restartCount", 0) >= 1, "a restart"
    )
    assert restarted
    wait_for(
        lambda: cluster.pod_logs(namespace, "crash", "main").count("cannot load the model") >= 2,
        "the second run",
    )


@pytest.fixture
def memory_limits():
    """Skips where the process kubelet cannot make memory cgroups (it then runs containers unlimited)."""
    if not memory_cgroups_available():
        pytest.skip("no writable memory cgroup here: the process kubelet runs containers unlimited")


def terminated(api, namespace: str, name: str) -> dict:
    return wait_for(
        lambda: container_status(api, namespace, name).get("state", {}).get("terminated"),
        f"{name} to be terminated",
    )


def test_a_container_over_its_memory_limit_is_oom_killed(cluster, namespace, memory_limits):
    """As on a real node: the limit is a memory cgroup, and the kernel's kill is `OOMKilled`."""
    hog = "print('started', flush=True); data = b'x' * (256 << 20); print('survived', flush=True)"
    limits = {"resources": {"limits": {"memory": "64Mi"}}}  # 256 MiB touched in 64 MiB
    hog_pod = pod("hog", ["python", "-c", hog], container=limits, restartPolicy="Never")
    cluster.api.create("v1", "pods", namespace, hog_pod)
    status = terminated(cluster.api, namespace, "hog")
    assert (status["reason"], status["exitCode"]) == ("OOMKilled", 137)
    log = cluster.pod_logs(namespace, "hog", "main")
    assert "started" in log and "survived" not in log


def test_a_container_sees_its_memory_limit_as_the_server_reads_it(cluster, namespace, memory_limits):
    show = (
        "from kvpilot.serving.engine.container_memory import host_memory; "
        "print('limit', host_memory().limit, flush=True)"
    )
    limits = {"resources": {"limits": {"memory": "300Mi"}}}
    cluster.api.create(
        "v1", "pods", namespace, pod("fits", ["python", "-c", show], container=limits, restartPolicy="Never")
    )
    status = terminated(cluster.api, namespace, "fits")
    log = cluster.pod_logs(namespace, "fits", "main")
    assert (status["reason"], status["exitCode"]) == ("Completed", 0), log
    assert f"limit {300 << 20}" in log


def test_three_gpu_pods_on_two_one_gpu_nodes_leave_one_unschedulable(cluster, namespace):
    gpu = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    for index in range(3):
        cluster.api.create("v1", "pods", namespace, pod(f"gpu-{index}", ["sleep", "300"], container=gpu))

    def verdicts():
        pods = cluster.api.list("v1", "pods", namespace)
        scheduled = [p for p in pods if condition(p, "PodScheduled").get("status") == "True"]
        unschedulable = [p for p in pods if condition(p, "PodScheduled").get("reason") == "Unschedulable"]
        return (len(scheduled), len(unschedulable)) == (2, 1) and (scheduled, unschedulable)

    scheduled, (pending,) = wait_for(verdicts, "two pods scheduled and one Unschedulable")
    assert {p["spec"]["nodeName"] for p in scheduled} == set(cluster.node_names)
    assert "Insufficient nvidia.com/gpu" in condition(pending, "PodScheduled")["message"]


def test_kubelet_and_control_plane_down_leave_no_process(tmp_path):
    with ControlPlane(tmp_path / "plane") as plane:
        kubelet = ProcessKubeletRunner(plane, nodes=1, gpus=0)
        kubelet.start()
        try:
            kubelet.api.create("v1", "pods", "default", pod("sleeper", ["sleep", "300"]))
            status = wait_for(
                lambda: (
                    "running" in container_status(kubelet.api, "default", "sleeper").get("state", {})
                    and container_status(kubelet.api, "default", "sleeper")
                ),
                "the pod to run",
            )
            pod_pid = int(status["containerID"].removeprefix("process://"))
            pids = [*plane.pids().values(), kubelet.process.pid, pod_pid]
        finally:
            kubelet.stop()
    assert [pid for pid in pids if pid_alive(pid)] == []
    with pytest.raises(ProcessLookupError):
        os.kill(pod_pid, signal.SIG_DFL)


# Serves the config file named by argv[1] at /, the file its `keyFile:` line names at /key, and
# $TOKEN at /env.
FILE_SERVER = """
import http.server, os, re, sys
class Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        text = open(sys.argv[1]).read()
        if self.path == "/key":
            text = open(re.search(r"keyFile: (\\S+)", text).group(1)).read()
        if self.path == "/env":
            text = os.environ["TOKEN"]
        self.send_response(200)
        self.end_headers()
        self.wfile.write(text.encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer((os.environ["POD_IP"], 8000), Files).serve_forever()
"""


def test_config_map_and_projected_secret_volumes_follow_the_api(cluster, namespace):
    """A projected Secret key waits for its Secret (FailedMount), a ConfigMap naming a mounted
    path finds it, an env var takes a Secret's key, and a changed ConfigMap reaches the running
    pod's file."""
    api = cluster.api
    api.create(
        "v1",
        "configmaps",
        namespace,
        {"metadata": {"name": "conf"}, "data": {"app.yaml": "keyFile: /etc/keys/alice\n"}},
    )
    key = {"secret": {"name": "creds", "items": [{"key": "k1", "path": "alice"}]}}
    volumes = [
        {"name": "conf", "configMap": {"name": "conf"}},
        {"name": "keys", "projected": {"sources": [key]}},
    ]
    mounts = [
        {"name": "conf", "mountPath": "/etc/conf", "readOnly": True},
        {"name": "keys", "mountPath": "/etc/keys", "readOnly": True},
    ]
    spec = pod("files", ["python", "-c", FILE_SERVER, "/etc/conf/app.yaml"], volumes=volumes)
    spec["spec"]["containers"][0]["volumeMounts"] = mounts
    token = {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "other"}}}
    spec["spec"]["containers"][0]["env"].append(token)
    api.create("v1", "pods", namespace, spec)
    waiting = wait_for(
        lambda: container_status(api, namespace, "files").get("state", {}).get("waiting"), "FailedMount"
    )
    assert 'secret "creds" not found' in waiting["message"]

    secret = {"metadata": {"name": "creds"}, "stringData": {"k1": "s3cret", "other": "never-mounted"}}
    api.create("v1", "secrets", namespace, secret)
    address = wait_for(
        lambda: (api.get("v1", "pods", namespace, "files") or {}).get("status", {}).get("podIP"), "an IP"
    )

    def get(path: str) -> str | None:
        try:
            response = httpx.get(f"http://{address}:8000{path}", timeout=2)
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    assert wait_for(lambda: get("/key"), "the key through the config's path", timeout=60) == "s3cret"
    (keys,) = (cluster.workdir / "pods").glob(f"{namespace}_files_*/volumes/keys")
    assert sorted(p.name for p in keys.iterdir()) == ["alice"]  # only the projected item
    assert get("/env") == "never-mounted"  # an env var from a secretKeyRef
    api.patch(
        "v1", "configmaps", namespace, "conf", {"data": {"app.yaml": "keyFile: /etc/keys/alice\nv: 2\n"}}
    )
    wait_for(lambda: "v: 2" in (get("/") or ""), "the changed ConfigMap in the running pod", timeout=30)
