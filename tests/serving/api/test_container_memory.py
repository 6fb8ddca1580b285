"""A CPU server in a real memory cgroup sizes its KV cache to what the limit leaves, instead of
taking the 1 GiB default and being OOM-killed (a pod's `resources.memory`). Needs a writable
cgroup v1 memory hierarchy or a v2 root that delegates memory (root in a VM or container)."""

import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.serving.api.conftest import ServeProcess

CGROUP = Path("/sys/fs/cgroup")
LIMIT = 1 << 30  # the tiny checkpoint's server holds ~0.6 GiB (Python, torch): < 0.3 GiB left


def _writable_parent() -> tuple[Path, str] | None:
    v1 = CGROUP / "memory"
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return v1, "memory.limit_in_bytes"
    controllers = CGROUP / "cgroup.subtree_control"
    if controllers.exists() and "memory" in controllers.read_text().split() and os.access(CGROUP, os.W_OK):
        return CGROUP, "memory.max"
    return None


@pytest.fixture
def memory_cgroup():
    found = _writable_parent()
    if found is None:
        pytest.skip("no writable memory cgroup here (needs root and cgroup v1, or v2 with memory delegated)")
    parent, limit_file = found
    group = parent / f"kvpilot-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(LIMIT))
    except OSError as error:
        pytest.skip(f"cannot create a memory cgroup here: {error}")
    if subprocess.run([*launcher(group), "true"]).returncode != 0:
        group.rmdir()
        pytest.skip("cannot move a process into a new memory cgroup here")
    yield group
    for _ in range(50):  # the killed server leaves the group a moment later
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def launcher(group: Path) -> tuple[str, ...]:
    return ("sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"))


def test_the_default_cache_shrinks_to_the_limit_and_the_server_answers(tiny_llama, memory_cgroup, tmp_path):
    server = ServeProcess(["--model", str(tiny_llama)], tmp_path / "log", launcher(memory_cgroup)).start()
    try:
        reply = httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": server_model(server), "prompt": "hello", "max_tokens": 8, "ignore_eos": True},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
    finally:
        returncode = server.stop()
    log = server.log.read_text()
    assert returncode == 0, log[-3000:]  # terminated, not OOM-killed (-9)
    assert "capped by 0.9 x the container's memory limit 1.00 GiB" in log, log[-3000:]


def test_an_explicit_cache_the_limit_cannot_hold_exits_1_naming_the_flag(tiny_llama, memory_cgroup, tmp_path):
    server = ServeProcess(
        ["--model", str(tiny_llama), "--kv-cache-memory", "1GiB"], tmp_path / "log", launcher(memory_cgroup)
    )
    assert server.process.wait(timeout=120) == 1
    assert (
        "--kv-cache-memory 1.00 GiB does not fit: 0.9 x the container's memory limit 1.00 GiB"
        in server.log.read_text()
    )


def server_model(server: ServeProcess) -> str:
    return httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
