"""The thin executor: the only module that talks to the Kubernetes API.

It reads an InferenceService's children, applies a Plan (server-side apply for creates and
updates, delete for children no longer wanted) and writes status. Failures worth retrying
surface as TransientError; the handlers turn them into kopf.TemporaryError with a backoff.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from kvpilot.operator.labels import MANAGER, is_owned_by, selector_labels
from kvpilot.operator.models import GROUP, PLURAL, VERSION, InferenceService
from kvpilot.operator.planner import Plan

TRANSIENT_STATUS = {404, 408, 409, 429}  # besides 5xx: conflicts, races with deletion, throttling
APPLY = {"field_manager": MANAGER, "force": True, "_content_type": "application/apply-patch+yaml"}


class TransientError(Exception):
    """An API failure that a later retry can fix (conflict, throttling, 5xx, timeout)."""


class PermanentApiError(Exception):
    """The API rejected what we sent (400, 422): retrying the same request cannot help."""


def _raw(response: Any) -> dict[str, Any]:
    return json.loads(response.data or b"{}")


class KubeClient:
    """Typed Kubernetes APIs per child kind, returning plain dicts."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        api_client = api_client or kubernetes.client.ApiClient()
        apps, core = kubernetes.client.AppsV1Api(api_client), kubernetes.client.CoreV1Api(api_client)
        policy = kubernetes.client.PolicyV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        # kind -> (list, apply, delete), all namespaced
        self.kinds: dict[str, tuple[Callable[..., Any], ...]] = {
            "Deployment": (
                apps.list_namespaced_deployment,
                apps.patch_namespaced_deployment,
                apps.delete_namespaced_deployment,
            ),
            "Service": (
                core.list_namespaced_service,
                core.patch_namespaced_service,
                core.delete_namespaced_service,
            ),
            "PodDisruptionBudget": (
                policy.list_namespaced_pod_disruption_budget,
                policy.patch_namespaced_pod_disruption_budget,
                policy.delete_namespaced_pod_disruption_budget,
            ),
            "ServiceAccount": (
                core.list_namespaced_service_account,
                core.patch_namespaced_service_account,
                core.delete_namespaced_service_account,
            ),
        }

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return _raw(fn(*args, _preload_content=False, **kwargs))
        except ApiException as exc:
            if exc.status in TRANSIENT_STATUS or (exc.status or 500) >= 500:
                raise TransientError(f"{fn.__name__}: HTTP {exc.status} {exc.reason}") from exc
            raise PermanentApiError(f"{fn.__name__}: HTTP {exc.status} {exc.reason}: {exc.body}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientError(f"{fn.__name__}: {exc}") from exc

    def read_children(self, isvc: InferenceService) -> list[dict[str, Any]]:
        """Children controlled by this InferenceService (by owner uid, not only by labels)."""
        selector = ",".join(f"{k}={v}" for k, v in selector_labels(isvc).items())
        children = []
        for kind, (list_fn, _, _) in self.kinds.items():
            listing = self._call(list_fn, isvc.metadata.namespace, label_selector=selector)
            for item in listing.get("items", []):
                # A real API server sets apiVersion and kind on the List only, not on its items.
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", listing.get("apiVersion"))
                if isvc.metadata.uid and is_owned_by(item, isvc.metadata.uid):
                    children.append(item)
        return children

    def execute(self, plan: Plan) -> dict[tuple[str, str], dict[str, Any]]:
        """Apply the plan; returns the objects as the server answered, by (kind, name).

        Creates and updates are both server-side applies of the whole desired object: the
        operator's field manager then owns exactly the fields it sets, so a field dropped from
        the desired object is removed, and one someone else added is left alone.
        """
        written = {}
        for obj in [*plan.create, *plan.update]:
            _, patch, _ = self.kinds[obj["kind"]]
            meta = obj["metadata"]
            written[obj["kind"], meta["name"]] = self._call(
                patch, meta["name"], meta["namespace"], obj, **APPLY
            )
        for obj in plan.delete:
            _, _, delete = self.kinds[obj["kind"]]
            meta = obj["metadata"]
            self._call(delete, meta["name"], meta["namespace"])
        return written

    def get_inference_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
        except TransientError as exc:
            if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
        )
