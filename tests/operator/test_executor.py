"""The executor against the API emulator: owner filtering, and which failures are retried."""

import kubernetes.client
import pytest
from kvpilot.operator.builders import build_children
from kvpilot.operator.executor import KubeClient, PermanentApiError, TransientError
from kvpilot.operator.handlers import backoff
from kvpilot.operator.planner import Plan, plan

from tests.operator.test_builders import UID, isvc


@pytest.fixture(scope="module")
def client(apiserver) -> KubeClient:
    configuration = kubernetes.client.Configuration(host=apiserver.url)
    return KubeClient(kubernetes.client.ApiClient(configuration))


def in_namespace(namespace: str, **spec):
    return isvc(**spec).model_copy(
        update={"metadata": isvc().metadata.model_copy(update={"namespace": namespace})}
    )


def test_create_then_read_back_only_owned_children(client, kubectl):
    service = in_namespace("exec-own")
    written = client.execute(plan(build_children(service), []))
    assert sorted(written) == [("Deployment", "chat"), ("PodDisruptionBudget", "chat"), ("Service", "chat")]
    # A look-alike with the same labels but another owner is not ours.
    foreign = build_children(in_namespace("exec-own"))[1]
    foreign["metadata"]["name"] = "other"
    foreign["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    kubectl.create("v1", "services", "exec-own", foreign)
    observed = client.read_children(service)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in observed) == sorted(written)
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == UID for o in observed)
    assert plan(build_children(service), observed).is_empty


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (409, TransientError),
        (429, TransientError),
        (500, TransientError),
        (503, TransientError),
        (422, PermanentApiError),
    ],
)
def test_failures_are_classified(client, apiserver, status, error):
    namespace = f"exec-fail-{status}"
    apiserver.server[f"post /api/v1/namespaces/{namespace}/services"] << status
    service = build_children(in_namespace(namespace))[1]
    with pytest.raises(error, match=str(status)):
        client.execute(Plan(create=[service]))


def test_unreachable_server_is_transient():
    configuration = kubernetes.client.Configuration(host="http://127.0.0.1:9")  # discard port: refused
    configuration.retries = 0
    client = KubeClient(kubernetes.client.ApiClient(configuration))
    with pytest.raises(TransientError):
        client.read_children(isvc())


def test_backoff_grows_and_is_capped():
    assert [backoff(retry) for retry in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
