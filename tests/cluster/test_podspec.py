from pathlib import Path

from kvpilot.kernels import native_build

from tests.cluster.podspec import PodContext, container_env


def context(tmp_path: Path) -> PodContext:
    return PodContext("p", "ns", "uid", "node-1", "10.213.0.2", tmp_path, volumes={})


def test_kvpilot_containers_find_the_kernels_this_machine_compiled(tmp_path, monkeypatch):
    machine_kernels = native_build.cache_dir()
    env = container_env({"name": "engine", "image": "ghcr.io/kvpilot/kvpilot:0.1.0"}, context(tmp_path))
    assert env["HOME"] == str(tmp_path)  # the pod's own home, its own files
    for name in ("HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, env[name])
    assert native_build.cache_dir() == machine_kernels


def test_other_images_share_no_cache(tmp_path):
    env = container_env({"name": "sidecar", "image": "busybox:1.36"}, context(tmp_path))
    assert "XDG_CACHE_HOME" not in env
