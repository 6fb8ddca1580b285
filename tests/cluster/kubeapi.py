"""A small synchronous Kubernetes REST client over httpx, built from a kubeconfig.

Plain dicts in and out (the objects the tests assert on), watches as an iterator of events.
Used by the process kubelet and by the tests (what a user or a controller does).
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

CONTENT_TYPES = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}


class ApiError(RuntimeError):
    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        try:
            self.body = response.json()
        except ValueError:
            self.body = {"message": response.text}
        self.message = self.body.get("message", "")
        super().__init__(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {self.message}"
        )


def ssl_context_from_kubeconfig(config: dict[str, Any]) -> tuple[str, ssl.SSLContext]:
    context_name = config["current-context"]
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    ssl_context = ssl.create_default_context(
        cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
    )
    with tempfile.TemporaryDirectory() as directory:  # load_cert_chain reads files only
        cert, key = Path(directory) / "client.crt", Path(directory) / "client.key"
        cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
        key.write_bytes(base64.b64decode(user["client-key-data"]))
        ssl_context.load_cert_chain(str(cert), str(key))
    return cluster["server"], ssl_context


def path(
    api: str, plural: str, namespace: str | None = None, name: str | None = None, sub: str | None = None
):
    prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
    parts = [prefix, "namespaces" if namespace else None, namespace, plural, name, sub]
    return "/".join(p for p in parts if p)


class KubeApi:
    # Generous: on a loaded shared machine (load 15 on 2 cores) kube-apiserver has taken over 10 s.
    def __init__(self, kubeconfig: Path, timeout: float = 60) -> None:
        server, context = ssl_context_from_kubeconfig(yaml.safe_load(Path(kubeconfig).read_text()))
        self.url = server
        self.http = httpx.Client(base_url=server, verify=context, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, url: str, **kwargs) -> dict[str, Any]:
        response = self.http.request(method, url, **kwargs)
        if response.status_code >= 400:
            raise ApiError(response)
        return response.json()

    def get(self, api: str, plural: str, namespace: str | None, name: str, sub: str | None = None):
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path(api, plural, namespace, name, sub))
        except ApiError as error:
            if error.status_code == 404:
                return None
            raise

    def list(self, api: str, plural: str, namespace: str | None = None, **params) -> list[dict[str, Any]]:
        return self.request("GET", path(api, plural, namespace), params=params)["items"]

    def create(
        self, api: str, plural: str, namespace: str | None, body: dict[str, Any], **params
    ) -> dict[str, Any]:
        return self.request("POST", path(api, plural, namespace), json=body, params=params)

    def patch(
        self,
        api: str,
        plural: str,
        namespace: str | None,
        name: str,
        body: Any,
        sub: str | None = None,
        kind: str = "merge",
        **params,
    ) -> dict[str, Any]:
        if kind == "json" and not isinstance(body, list):
            raise ValueError("a JSON patch is a list of operations")
        content = yaml.safe_dump(body) if kind == "apply" else json.dumps(body)
        headers = {"Content-Type": CONTENT_TYPES[kind]}
        url = path(api, plural, namespace, name, sub)
        return self.request("PATCH", url, content=content, headers=headers, params=params)

    def apply(
        self, body: dict[str, Any], field_manager: str, force: bool = False, sub: str | None = None
    ) -> dict[str, Any]:
        """Server-side apply of one object (its plural is its kind's lower-cased plural)."""
        metadata = body["metadata"]
        params = {"fieldManager": field_manager, **({"force": "true"} if force else {})}
        plural = body["kind"].lower() + "s"
        return self.patch(
            body["apiVersion"],
            plural,
            metadata.get("namespace"),
            metadata["name"],
            body,
            sub,
            "apply",
            **params,
        )

    def replace(self, api: str, plural: str, namespace: str | None, name: str, body, sub: str | None = None):
        return self.request("PUT", path(api, plural, namespace, name, sub), json=body)

    def delete(self, api: str, plural: str, namespace: str | None, name: str, **options) -> bool:
        """Delete (DeleteOptions as keyword arguments); False when it was already gone."""
        try:
            self.request("DELETE", path(api, plural, namespace, name), json=options or None)
        except ApiError as error:
            if error.status_code == 404:
                return False
            raise
        return True

    def watch(
        self, api: str, plural: str, namespace: str | None = None, timeout_seconds: int = 60, **params
    ) -> Iterator[dict[str, Any]]:
        """Events ({"type", "object"}) until the server ends the watch; BOOKMARKs included."""
        query = {
            "watch": "1",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
            **params,
        }
        timeout = httpx.Timeout(10, read=timeout_seconds + 10)
        with self.http.stream("GET", path(api, plural, namespace), params=query, timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response)
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)
