"""Test support: kmock's KubernetesEmulator made close enough to a kube-apiserver for kopf.

kmock 0.8 gaps filled here (test code only, never product code):
- no uid/resourceVersion/generation/creationTimestamp, no generateName;
- a server-side apply (PATCH) of a missing object answers 404 instead of creating it;
- a failed JSON-patch `test` answers 500 (a real server: 422 Unprocessable Entity);
- no garbage collection of objects whose ownerReferences point to deleted owners;
- label selectors are ignored on lists;
- `GET /api/v1/namespaces` (kopf lists and watches it in namespaced mode) breaks its path parser;
- discovery must list v1/namespaces and the CRD resource, or kopf waits silently.
The server runs in its own thread and event loop so the operator (KopfRunner's thread) and
the synchronous test talk to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import socket
import threading
import uuid
from typing import Any

import aiohttp.web
import attrs
import httpx
import jsonpatch
import kmock
from kmock._internal import dicts as kmock_dicts  # kmock's own merge-patch semantics

RESOURCES = {
    "kvpilot.dev/v1alpha1/inferenceservices": kmock.ResourceInfo(
        kind="InferenceService",
        namespaced=True,
        shortnames={"isvc"},
        verbs={"get", "list", "watch", "create", "patch", "delete"},
        subresources={"status", "scale"},
    ),
    "apps/v1/deployments": kmock.ResourceInfo(
        kind="Deployment",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "delete"},
        subresources={"status", "scale"},
    ),
    "v1/services": kmock.ResourceInfo(
        kind="Service", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}
    ),
    "v1/configmaps": kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}
    ),
    "v1/serviceaccounts": kmock.ResourceInfo(
        kind="ServiceAccount", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}
    ),
    "policy/v1/poddisruptionbudgets": kmock.ResourceInfo(
        kind="PodDisruptionBudget",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    ),
    "autoscaling/v2/horizontalpodautoscalers": kmock.ResourceInfo(
        kind="HorizontalPodAutoscaler",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    ),
    # keda.sh ScaledObjects are not served: a cluster without KEDA.
    "v1/persistentvolumeclaims": kmock.ResourceInfo(
        kind="PersistentVolumeClaim",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    ),
    "batch/v1/jobs": kmock.ResourceInfo(
        kind="Job", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"}
    ),
    "v1/pods": kmock.ResourceInfo(
        kind="Pod", namespaced=True, verbs={"get", "list", "watch", "create", "delete"}
    ),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create", "list"}),
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"get", "list", "watch"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"get", "list", "watch"}
    ),
}
APPLY_PATCH = "application/apply-patch+yaml"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches_selector(obj: dict[str, Any], selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name, info in RESOURCES.items():
            self.resources[name] = info

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's path parser fails on the cluster-wide namespace list, which kopf lists and
        # watches when it serves specific namespaces: answer it here, before kmock parses.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        names = {"default"} | {ns for (_, ns, _), obj in self.objects.items() if ns and not obj.deleted}
        items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in sorted(names)]
        if raw_request.query.get("watch") not in ("true", "1"):
            listing = {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"}}
            return aiohttp.web.json_response({**listing, "items": items})
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        for item in items:
            await response.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        await asyncio.sleep(float(raw_request.query.get("timeoutSeconds", 3600)))
        return response

    def _find(self, request: kmock.Request) -> Any:
        try:
            obj = self.objects[request.resource, request.namespace, request.name]
        except KeyError:
            return None
        return None if obj.deleted else obj

    async def _prepare(self, request: kmock.Request) -> None:
        """Stamp server-owned metadata the way kube-apiserver does, before kmock stores it.

        kmock's Request is frozen but its parsed body is a plain container: edit it in place.
        """
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            self._stamp_new(request.data, request.namespace)
            return
        if request.action == kmock.action.UPDATE and request.name is not None:
            current = self._find(request)
            if current is None and request.headers.get("Content-Type", "").startswith(APPLY_PATCH):
                await self._apply_creates(request)
                return
            if current is None:
                return  # kmock answers 404
            before = copy.deepcopy(current.raw)
            patch = request.data
            if isinstance(patch, list):
                try:
                    after = jsonpatch.apply_patch(before, patch, in_place=False)
                except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as exc:
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc
            else:
                after = kmock_dicts.patch_dict(before, patch or {})
            generation = before["metadata"].get("generation") or 1
            if {k: v for k, v in after.items() if k not in ("metadata", "status")} != {
                k: v for k, v in before.items() if k not in ("metadata", "status")
            }:
                generation += 1
            after["metadata"] = {
                **after.get("metadata", {}),
                "resourceVersion": str(next(self._versions)),
                "generation": generation,
            }
            # Store the patched object as is (kmock would merge, keeping removed keys), then let
            # kmock apply an empty patch so it still answers and streams the MODIFIED event.
            current.history.append(kmock.ObjectVersion(after))
            request.data.clear()

    def _stamp_new(self, data: dict[str, Any], namespace: str | None) -> None:
        metadata = data.setdefault("metadata", {})
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
        if namespace and not metadata.get("namespace"):
            metadata["namespace"] = namespace
        metadata.update(
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._versions)),
            generation=1,
            creationTimestamp=_now(),
        )

    async def _apply_creates(self, request: kmock.Request) -> None:
        """Server-side apply of a missing object creates it (kmock would answer 404)."""
        data = copy.deepcopy(request.data)
        self._stamp_new(data, request.namespace)
        key = (request.resource, request.namespace, request.name)
        if key in self.objects:
            self.objects[key].create(data)
        else:
            self.objects[key] = data
        await self._buses[request.resource].put({"type": "ADDED", "object": self.objects[key].raw})
        request.data.clear()  # kmock then applies an empty patch to the stored object

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is None:
            return await super()._handle(request)
        await self._prepare(request)
        response = await super()._handle(request)
        if request.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            await self._collect_garbage()
        return response

    async def _collect_garbage(self) -> None:
        """The garbage collector: delete objects whose owners are all gone (also late-created ones)."""
        while True:
            live = [(key, obj) for key, obj in self.objects.items() if not obj.deleted]
            uids = {obj.raw["metadata"].get("uid") for _, obj in live}
            orphans = [
                (key, obj)
                for key, obj in live
                if (refs := obj.raw["metadata"].get("ownerReferences"))
                and not any(r.get("uid") in uids for r in refs)
            ]
            if not orphans:
                return
            for (resource, _, _), obj in orphans:
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})

    async def _serve_list(self, request: kmock.Request) -> Any:
        listing = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            listing["items"] = [obj for obj in listing["items"] if _matches_selector(obj, selector)]
        listing["metadata"] = {"resourceVersion": str(next(self._versions))}
        return listing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiServerThread:
    """Runs ApiServer on 127.0.0.1:port in a background thread with its own event loop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server: ApiServer | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServer() as server, kmock.Server(server, port=self.port):
            self.server = server
            self._ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("kmock did not start")

    def stop(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


class Kubectl:
    """A tiny synchronous API client for the test's side (what a user or a controller does)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    @staticmethod
    def path(api: str, plural: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
        parts = [prefix, "namespaces", namespace, plural, name, sub]
        return "/".join(p for p in parts if p)

    def get(self, api: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        response = self.http.get(self.path(api, plural, namespace, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def list(self, api: str, plural: str, namespace: str) -> list[dict[str, Any]]:
        response = self.http.get(self.path(api, plural, namespace))
        response.raise_for_status()
        return response.json()["items"]

    def create(self, api: str, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(self.path(api, plural, namespace), json=body)
        response.raise_for_status()
        return response.json()

    def patch(
        self, api: str, plural: str, namespace: str, name: str, body: Any, sub: str | None = None
    ) -> dict[str, Any]:
        content_type = (
            "application/json-patch+json" if isinstance(body, list) else "application/merge-patch+json"
        )
        response = self.http.patch(
            self.path(api, plural, namespace, name, sub), json=body, headers={"Content-Type": content_type}
        )
        response.raise_for_status()
        return response.json()

    def delete(self, api: str, plural: str, namespace: str, name: str) -> None:
        self.http.delete(self.path(api, plural, namespace, name)).raise_for_status()
