"""The executor against the API emulator: owner filtering, and which failures are retried."""

import kubernetes.client
import pytest
from kvpilot.operator.builders import build_children
from kvpilot.operator.executor import KubeClient, PermanentApiError, TransientError
from kvpilot.operator.handlers import backoff
from kvpilot.operator.planner import Plan, plan
from kvpilot.operator.revision import revision_hash

from tests.operator.test_builders import isvc


@pytest.fixture(scope="module")
def client(apiserver) -> KubeClient:
    configuration = kubernetes.client.Configuration(host=apiserver.url)
    return KubeClient(kubernetes.client.ApiClient(configuration))


def owned_in(kubectl, namespace: str):
    """An InferenceService stored in the emulator (a real owner uid, so no garbage collection)."""
    body = {"apiVersion": "kvpilot.dev/v1alpha1", "kind": "InferenceService", "spec": {}}
    body["metadata"] = {"name": "chat", "namespace": namespace}
    stored = kubectl.create("kvpilot.dev/v1alpha1", "inferenceservices", namespace, body)
    metadata = isvc().metadata.model_copy(update={"namespace": namespace, "uid": stored["metadata"]["uid"]})
    return isvc().model_copy(update={"metadata": metadata})


def test_create_then_read_back_only_owned_children(client, kubectl):
    service = owned_in(kubectl, "exec-own")
    written = client.execute(plan(build_children(service), []))
    engine = f"chat-{revision_hash(service.spec)}"
    assert sorted(written) == [
        ("ConfigMap", "chat-router"),
        ("Deployment", engine),
        ("Deployment", "chat-router"),
        ("PodDisruptionBudget", "chat"),
        ("PodDisruptionBudget", "chat-router"),
        ("Service", "chat"),
        ("Service", "chat-engine"),
    ]
    # A look-alike with the same labels but another owner is not ours.
    foreign = build_children(owned_in(kubectl, "exec-foreign"))[1]
    foreign["metadata"].update(name="other", namespace="exec-own")
    kubectl.create("v1", "services", "exec-own", foreign)
    observed = client.read_children(service)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in observed) == sorted(written)
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == service.metadata.uid for o in observed)
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
    apiserver.server[f"patch /api/v1/namespaces/{namespace}/services/chat"] << status
    (service,) = [
        c for c in build_children(isvc()) if c["metadata"]["name"] == "chat" and c["kind"] == "Service"
    ]
    service["metadata"]["namespace"] = namespace
    with pytest.raises(error, match=f"apply Service: HTTP {status}"):
        client.execute(Plan(create=[service]))


def test_unreachable_server_is_transient():
    configuration = kubernetes.client.Configuration(host="http://127.0.0.1:9")  # discard port: refused
    configuration.retries = 0
    client = KubeClient(kubernetes.client.ApiClient(configuration))
    with pytest.raises(TransientError):
        client.read_children(isvc())


def test_backoff_grows_and_is_capped():
    assert [backoff(retry) for retry in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_keyed_locks_serialize_one_key_and_forget_it_when_released():
    import threading

    from kvpilot.operator.handlers import KeyedLocks

    locks, order = KeyedLocks(), []
    entered = threading.Event()

    def second():
        with locks.hold(("ns", "a")):
            order.append("second")

    with locks.hold(("ns", "a")):
        thread = threading.Thread(target=second)
        thread.start()
        entered.wait(0.2)  # the second holder is blocked meanwhile
        order.append("first")
        with locks.hold(("ns", "b")):  # another key is independent
            assert len(locks) == 2
    thread.join(5)
    assert order == ["first", "second"]
    assert len(locks) == 0


def test_a_scaled_object_without_keda_is_a_permanent_error_naming_keda(client, kubectl):
    keda = {"engine": "keda", "maxReplicas": 3, "target": 2, "prometheus": {"address": "http://prom:9090"}}
    service = owned_in(kubectl, "exec-keda").model_copy(update={"spec": isvc(autoscaling=keda).spec})
    assert not client.serves("ScaledObject")  # the emulator serves no keda.sh
    assert client.read_children(service) == []  # so none are listed, and that is no error
    desired = build_children(service)
    with pytest.raises(PermanentApiError, match=r"KEDA .* is not installed"):
        client.execute(plan(desired, []))
    hpa = [
        c
        for c in build_children(isvc(autoscaling={**keda, "engine": "hpa"}))
        if c["kind"].startswith("Horiz")
    ]
    hpa[0]["metadata"]["namespace"] = "exec-keda"
    assert client.execute(Plan(create=hpa))[("HorizontalPodAutoscaler", "chat")]["spec"]["maxReplicas"] == 3


def test_an_apply_the_server_cannot_type_is_permanent_though_it_is_a_500():
    """kube-apiserver's answer to an env var named twice (test_crd_apiserver reproduced it):
    retrying the same apply forever would hide it; it is reported like a 422."""
    from kubernetes.client.exceptions import ApiException
    from kvpilot.operator.executor import _classified

    exc = ApiException(status=500, reason="Internal Server Error")
    exc.body = (
        b'{"kind":"Status","status":"Failure","message":"failed to create typed patch object '
        b'(team-a/chat-1; apps/v1, Kind=Deployment): .spec.template.spec.containers[name=\\"server\\"].env: '
        b'duplicate entries for key [name=\\"HF_HOME\\"]","code":500}'
    )
    error = _classified(exc, "apply Deployment")
    assert isinstance(error, PermanentApiError) and "duplicate entries" in str(error)


def test_a_rejected_write_carries_the_api_servers_message():
    from kubernetes.client.exceptions import ApiException
    from kvpilot.operator.executor import _classified

    exc = ApiException(status=422, reason="Unprocessable Entity")
    exc.body = (
        b'{"kind":"Status","status":"Failure","message":"Deployment.apps \\"chat\\" is invalid: '
        b'spec.template.spec.affinity.nodeAffinity: Unsupported value: \\"Near\\"","code":422}'
    )
    error = _classified(exc, "apply Deployment")
    assert isinstance(error, PermanentApiError)
    assert str(error) == (
        'apply Deployment: HTTP 422 Unprocessable Entity: Deployment.apps "chat" is invalid: '
        'spec.template.spec.affinity.nodeAffinity: Unsupported value: "Near"'
    )
    forbidden = ApiException(status=403, reason="Forbidden")
    forbidden.body = "not json"
    assert str(_classified(forbidden, "apply Job")) == "apply Job: HTTP 403 Forbidden: not json"
