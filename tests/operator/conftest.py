import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.operator.apiserver import ApiServerThread, Kubectl, free_port

# The kubernetes client reads KUBECONFIG's location when it is first imported: set it now,
# write the file once the emulator's port is known (kopf logs in only when the operator starts).
_KUBECONFIG = Path(tempfile.mkdtemp(prefix="kvpilot-kubeconfig-")) / "config"
os.environ["KUBECONFIG"] = str(_KUBECONFIG)
if "kubernetes" in sys.modules:  # imported earlier in this session: point it at the same file
    import kubernetes.config.kube_config

    kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(_KUBECONFIG)


def _write_kubeconfig(url: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
        "current-context": "kmock",
    }
    _KUBECONFIG.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def apiserver():
    server = ApiServerThread(free_port())
    server.start()
    _write_kubeconfig(server.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kubectl(apiserver) -> Kubectl:
    return Kubectl(apiserver.url)
