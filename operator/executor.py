"""The thin executor: the only module that talks to the Kubernetes API.

It reads an InferenceService's children, applies a Plan (server-side apply for creates and
updates, delete for children no longer wanted) and writes status. Failures worth retrying
surface as TransientError; the handlers turn them into kopf.TemporaryError with a backoff.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from kvpilot.operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION, InferenceService
from kvpilot.operator.labels import MANAGER, is_owned_by, owned_selector
from kvpilot.operator.planner import Plan
from kvpilot.operator.router_builders import INFERENCE_POOL_API_VERSION
from kvpilot.operator.router_config import SERVICE_NAME_LABEL

TRANSIENT_STATUS = {404, 408, 409, 429}  # besides 5xx: conflicts, races with deletion, throttling
APPLY_QUERY = {"fieldManager": MANAGER, "force": "true"}  # server-side apply, taking ownership
MERGE_PATCH = "application/merge-patch+json"


class TransientError(Exception):
    """An API failure that a later retry can fix (conflict, throttling, 5xx, timeout)."""


class PermanentApiError(Exception):
    """The API rejected what we sent (400, 403, 422): retrying the same request cannot help.
    The message carries the API server's own, which names the field."""


def _raw(response: Any) -> dict[str, Any]:
    return json.loads(response.data or b"{}")


def api_message(body: Any) -> str:
    """The `message` of a metav1.Status body, or the body as text."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        return json.loads(text).get("message") or text
    except (ValueError, AttributeError):
        return text


# A 500 that server-side apply answers for an object it cannot type (a list map with one key twice,
# e.g. an env var named twice): the same apply fails again, so it is reported, not retried.
UNTYPABLE_APPLY = "failed to create typed patch object"


def _classified(exc: ApiException, what: str) -> Exception:
    message = api_message(exc.body)
    transient = exc.status in TRANSIENT_STATUS or (exc.status or 500) >= 500
    if transient and UNTYPABLE_APPLY not in message:
        return TransientError(f"{what}: HTTP {exc.status} {exc.reason}")
    return PermanentApiError(f"{what}: HTTP {exc.status} {exc.reason}: {message}")


def _is_not_found(exc: TransientError) -> bool:
    return isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404


# Every namespaced child kind the operator owns: kind -> (apiVersion, plural). A new child kind
# (an HPA, a ConfigMap, an InferencePool) is one more row here and nothing else.
CHILD_KINDS: dict[str, tuple[str, str]] = {
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "ConfigMap": ("v1", "configmaps"),
    "InferencePool": (INFERENCE_POOL_API_VERSION, "inferencepools"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers"),
    "ScaledObject": ("keda.sh/v1alpha1", "scaledobjects"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "Job": ("batch/v1", "jobs"),
}
# Kinds from CRDs a cluster may not have: listed and written only where discovery shows them.
OPTIONAL_KINDS = {"InferencePool", "ScaledObject"}
# What a missing one means, when the spec asks for it (an InferencePool is only built where served).
MISSING_KINDS = {"ScaledObject": "KEDA (keda.sh/v1alpha1 ScaledObject) is not installed in the cluster"}
DISCOVERY_TTL_SECONDS = 60.0
# Metadata only: the API server leaves out a Secret's data (the operator never sees a key).
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def resource_path(api_version: str, plural: str, namespace: str, name: str | None = None) -> str:
    """`/api/v1/...` for the core group, `/apis/GROUP/VERSION/...` for the others."""
    root = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class KubeClient:
    """Reads and writes children by apiVersion/kind (`CHILD_KINDS`) and the InferenceService's
    status, returning plain dicts."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        self.api = api_client or kubernetes.client.ApiClient()
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self._discovered: dict[str, tuple[float, bool]] = {}  # kind -> (when, served)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return _raw(fn(*args, _preload_content=False, **kwargs))
        except ApiException as exc:
            raise _classified(exc, fn.__name__) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientError(f"{fn.__name__}: {exc}") from exc

    def _request(
        self,
        what: str,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
        accept: str = "application/json",
        content_type: str = "application/apply-patch+yaml",
    ) -> dict[str, Any]:
        """One REST call; `what` names it in errors (e.g. `apply Deployment`). A PATCH is a
        server-side apply unless another content type is given."""
        headers = {"Accept": accept}
        if method == "PATCH":
            headers["Content-Type"] = content_type
        elif body is not None:
            headers["Content-Type"] = "application/json"
        request = self.api.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"],
        )  # fmt: skip
        try:
            response = self.api.call_api(*request)
            response.read()
            if response.status >= 400:
                raise ApiException(http_resp=response)
        except ApiException as exc:
            raise _classified(exc, what) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientError(f"{what}: {exc}") from exc
        return _raw(response)

    def serves(self, kind: str) -> bool:
        """Whether the cluster serves this child kind (discovery, remembered for a minute)."""
        if kind not in OPTIONAL_KINDS:
            return True
        when, served = self._discovered.get(kind, (0.0, False))
        if time.monotonic() - when < DISCOVERY_TTL_SECONDS:
            return served
        api_version, plural = CHILD_KINDS[kind]
        try:
            listing = self._request(f"discover {kind}", "GET", f"/apis/{api_version}")
            served = any(resource.get("name") == plural for resource in listing.get("resources", []))
        except TransientError as exc:
            if not _is_not_found(exc):
                raise
            served = False
        self._discovered[kind] = (time.monotonic(), served)
        return served

    def read_children(self, isvc: InferenceService) -> list[dict[str, Any]]:
        """Children controlled by this InferenceService (by owner uid, not only by labels)."""
        selector = owned_selector(isvc)
        children = []
        for kind, (api_version, plural) in CHILD_KINDS.items():
            if not self.serves(kind):
                continue
            path = resource_path(api_version, plural, isvc.metadata.namespace)
            listing = self._request(f"list {kind}", "GET", path, {"labelSelector": selector})
            for item in listing.get("items", []):
                # A real API server sets apiVersion and kind on the List only, not on its items.
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", api_version)
                if isvc.metadata.uid and is_owned_by(item, isvc.metadata.uid):
                    children.append(item)
        return children

    def read_pods(self, isvc: InferenceService) -> list[dict[str, Any]]:
        """The InferenceService's pods: every revision's engine replicas, its router's and its model
        downloads (by the labels every child carries)."""
        selector = owned_selector(isvc)
        path = resource_path("v1", "pods", isvc.metadata.namespace)
        return self._request("list Pod", "GET", path, {"labelSelector": selector}).get("items", [])

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        """Set only the replicas of a revision's Deployment (one that is no longer re-applied)."""
        path = resource_path("apps/v1", "deployments", namespace, name)
        body = {"spec": {"replicas": replicas}}
        self._request(
            "scale Deployment", "PATCH", path, {"fieldManager": MANAGER}, body, content_type=MERGE_PATCH
        )

    def post_event(
        self, isvc: InferenceService, event_type: str, reason: str, message: str, now: str
    ) -> None:
        """A core/v1 Event on the InferenceService (kubectl describe, `kubectl get events`)."""
        meta = isvc.metadata
        body = {
            "metadata": {"generateName": f"{meta.name}.", "namespace": meta.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION, "kind": KIND, "name": meta.name,
                "namespace": meta.namespace, "uid": meta.uid,
            },
            "type": event_type, "reason": reason, "message": message[:1024],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": MANAGER}, "reportingComponent": MANAGER,
        }  # fmt: skip
        self._request("post Event", "POST", resource_path("v1", "events", meta.namespace), body=body)

    def execute(self, plan: Plan) -> dict[tuple[str, str], dict[str, Any]]:
        """Apply the plan; returns the objects as the server answered, by (kind, name).

        Creates and updates are both server-side applies of the whole desired object: the
        operator's field manager then owns exactly the fields it sets, so a field dropped from
        the desired object is removed, and one someone else added is left alone.
        """
        written = {}
        for patch in plan.reset:  # list entries an apply cannot merge away (planner.list_reset)
            path = self._child_path(patch)
            self._request(f"reset {patch['kind']}", "PATCH", path, body=patch, content_type=MERGE_PATCH)
        for obj in [*plan.create, *plan.update]:
            kind = obj["kind"]
            if not self.serves(kind):
                raise PermanentApiError(
                    f"apply {kind}: {MISSING_KINDS.get(kind, 'not served by the cluster')}"
                )
            meta = obj["metadata"]
            path = self._child_path(obj)
            written[obj["kind"], meta["name"]] = self._request(
                f"apply {obj['kind']}", "PATCH", path, APPLY_QUERY, body=obj
            )
        for obj in plan.delete:
            self._request(f"delete {obj['kind']}", "DELETE", self._child_path(obj))
        return written

    @staticmethod
    def _child_path(obj: dict[str, Any]) -> str:
        api_version, plural = CHILD_KINDS[obj["kind"]]
        meta = obj["metadata"]
        return resource_path(api_version, plural, meta["namespace"], meta["name"])

    def read_endpoint_slices(self, namespace: str, services: list[str]) -> list[dict[str, Any]]:
        """The EndpointSlices of these Services (the EndpointSlice controller labels each)."""
        path = resource_path("discovery.k8s.io/v1", "endpointslices", namespace)
        selector = f"{SERVICE_NAME_LABEL} in ({','.join(services)})"
        return self._request("list EndpointSlice", "GET", path, {"labelSelector": selector}).get("items", [])

    def missing_secrets(self, namespace: str, names: list[str]) -> list[str]:
        """Which of these Secrets do not exist. Asked for metadata only: no key reaches the operator."""
        missing = []
        for name in names:
            path = resource_path("v1", "secrets", namespace, name)
            try:
                self._request("get Secret", "GET", path, accept=METADATA_ONLY)
            except TransientError as exc:
                if not _is_not_found(exc):
                    raise
                missing.append(name)
        return missing

    def get_inference_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
        except TransientError as exc:
            if _is_not_found(exc):
                return None
            raise

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        path = resource_path("apps/v1", "deployments", namespace, name)
        try:
            return self._request("get Deployment", "GET", path)
        except TransientError as exc:
            if _is_not_found(exc):
                return None
            raise

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        path = resource_path("v1", "pods", namespace)
        return self._request("list Pod", "GET", path, {"labelSelector": selector}).get("items", [])

    def apply_replicas(self, namespace: str, name: str, replicas: int, manager: str) -> dict[str, Any]:
        """Server-side apply of a Deployment's spec.replicas alone, as `manager` (who then owns it)."""
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas},
        }
        path = resource_path("apps/v1", "deployments", namespace, name)
        query = {"fieldManager": manager, "force": "true"}
        return self._request("scale Deployment", "PATCH", path, query, body=body)

    def create_event(self, event: dict[str, Any]) -> None:
        path = resource_path("v1", "events", event["metadata"]["namespace"])
        self._request("create Event", "POST", path, body=event)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            _content_type=MERGE_PATCH,
        )
