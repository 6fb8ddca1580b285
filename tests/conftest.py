import os
from pathlib import Path

# One intra-op thread per process: the tests run servers in subprocesses beside the test process,
# and on 2 cores oversubscribed torch threads make token-by-token decoding up to 10x slower.
# Set before torch is imported so the servers the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from tests.checkpoints import (
    ARCHITECTURES,
    build_checkpoint,
    default_gguf_path,
    save_real_tokenizer,
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist every worker runs its own control plane and process kubelet (tests/cluster):
    each hands out pod addresses from its own range, so two workers' pods never take the same one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker:
        os.environ.setdefault("KVPILOT_POD_CIDR", f"10.213.{int(worker.removeprefix('gw'))}.0/24")


# The operator's end-to-end suites, longest first: minutes each, mostly waiting on pods and controllers.
SLOWEST_FILES = ("test_operator_e2e.py", "test_rollout_e2e.py", "test_autoscaler_e2e.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest files first, longest first: under `make test` (`pytest -n 2 --dist loadfile`)
    the workers start on them and share the rest after, instead of the longest file starting last."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    save_real_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """One small random checkpoint per supported architecture, with the real tokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_checkpoint(arch, root / arch, tokenizer_dir) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


CONTROL_PLANE_FIXTURES = {"control_plane", "cluster"}


def pytest_collection_finish(session):
    """Build the Kubernetes binaries before the first test that needs them (first use only).

    Outside any test so that a cold build (minutes, see README "Local control plane") is not cut by
    a test's timeout. A failed build is not reported here: the fixture raises it again, and every
    test that needs the control plane then fails (never skips).
    """
    if not any(CONTROL_PLANE_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        return
    from tests.cluster.build import BuildError, binaries_present, ensure_binaries

    if binaries_present():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    log = reporter.write_line if reporter else print
    try:
        ensure_binaries(log=log)
    except BuildError as error:
        log(f"building the Kubernetes binaries failed: {error}")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler on 127.0.0.1 (tests/cluster)."""
    from tests.cluster.controlplane import ControlPlane

    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def cluster(control_plane):
    """The control plane plus the process kubelet: two Nodes with one nvidia.com/gpu each."""
    from tests.cluster.harness import ProcessKubeletRunner

    kubelet = ProcessKubeletRunner(control_plane, nodes=2, gpus=1)
    kubelet.start()
    yield kubelet
    kubelet.stop()
