"""A CPU server in a real memory cgroup sizes its KV cache to what the limit leaves, instead of
taking the 1 GiB default and being OOM-killed (a pod's `resources.memory`). Needs a writable
cgroup v1 memory hierarchy or a v2 root that delegates memory (root in a VM or container)."""

import uuid

import httpx
import pytest

from tests.cluster.cgroups import MemoryCgroup
from tests.serving.api.conftest import ServeProcess

LIMIT = 1 << 30  # the tiny checkpoint's server holds ~0.45 GiB (Python, torch): < 0.5 GiB left


@pytest.fixture
def memory_cgroup():
    group = MemoryCgroup.create(f"kvpilot-test-{uuid.uuid4().hex[:8]}", LIMIT)
    if group is None:
        pytest.skip("no writable memory cgroup here (needs root and cgroup v1, or v2 with memory delegated)")
    yield group
    group.remove()


def test_the_default_cache_shrinks_to_the_limit_and_the_server_answers(tiny_llama, memory_cgroup, tmp_path):
    server = ServeProcess(["--model", str(tiny_llama)], tmp_path / "log", memory_cgroup.enter).start()
    try:
        model = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        reply = httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": model, "prompt": "hello", "max_tokens": 8, "ignore_eos": True},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
    finally:
        returncode = server.stop()
    log = server.log.read_text()
    assert returncode == 0 and memory_cgroup.oom_kills() == 0, log[-3000:]  # terminated, not OOM-killed
    assert "capped by 0.9 x the container's memory limit 1.00 GiB" in log, log[-3000:]


def test_an_explicit_cache_the_limit_cannot_hold_exits_1_naming_the_flag(tiny_llama, memory_cgroup, tmp_path):
    args = ["--model", str(tiny_llama), "--kv-cache-memory", "1GiB"]
    server = ServeProcess(args, tmp_path / "log", memory_cgroup.enter)
    assert server.process.wait(timeout=120) == 1
    expected = "--kv-cache-memory 1.00 GiB does not fit: 0.9 x the container's memory limit 1.00 GiB"
    assert expected in server.log.read_text()
