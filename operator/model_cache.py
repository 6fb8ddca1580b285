"""Getting the model's files into the engine pods (pure builders).

Without `spec.model.cache` every pod downloads the model into its own emptyDir (bounded by
`spec.model.size`). With it, one Job per model and revision downloads into a
PersistentVolumeClaim and writes a completion marker last; the engine pods wait for the marker
(an init container) and mount the claim read-only, so rollouts, restarts and scale-outs start
from the cache.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kvpilot.operator.api import DEFAULT_CUDA_IMAGE, DEFAULT_IMAGE, InferenceService
from kvpilot.operator.containers import pod_security_context, security_context
from kvpilot.operator.labels import MANAGER, bounded_name, child_metadata, service_account_name

MODEL_DIR = "/mnt/models"
COMPLETE_MARKER = f"{MODEL_DIR}/.kvpilot-download-complete"
AWS_CLI_IMAGE = "public.ecr.aws/aws-cli/aws-cli:2.22.35"
GCLOUD_IMAGE = "gcr.io/google.com/cloudsdktool/google-cloud-cli:502.0.0-slim"
DOWNLOAD_POD_NAME = "kvpilot-model-download"  # app.kubernetes.io/name of the Job's pods
DOWNLOAD_BACKOFF_LIMIT = 2
WAIT_SECONDS = 5

# The marker holds what was downloaded; the engine pods' init container polls for it.
_MARK = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2] + '\\n')"
_WAIT = (
    "import os, sys, time\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    print('waiting for the model download Job to finish', flush=True)\n"
    "    time.sleep(float(sys.argv[2]))\n"
)


def base_env(isvc: InferenceService, *defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """HOME, HF_HOME and `defaults`, then spec.env; a spec.env entry of the same name replaces
    the operator's (a list with one name twice is rejected by server-side apply)."""
    wanted = [env.model_dump(by_alias=True, exclude_none=True) for env in isvc.spec.env]
    given = {env["name"] for env in wanted}
    base = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf-home"}, *defaults]
    return [env for env in base if env["name"] not in given] + wanted


def server_image(isvc: InferenceService) -> str:
    """spec.image, or the CUDA variant of the kvpilot image for GPU replicas."""
    return isvc.spec.image or (DEFAULT_CUDA_IMAGE if isvc.spec.resources.gpu.count else DEFAULT_IMAGE)


def tool_image(isvc: InferenceService) -> str:
    """The image of the download, wait and marker containers: spec.image, or the CPU variant."""
    return isvc.spec.image or DEFAULT_IMAGE


def is_downloaded(isvc: InferenceService) -> bool:
    return isvc.spec.model.uri.partition("://")[0] in ("hf", "s3", "gs")


def model_revision(isvc: InferenceService) -> str:
    """What is downloaded: the URI with its revision (hf:// defaults to main)."""
    uri = isvc.spec.model.uri
    if not uri.startswith("hf://"):
        return uri
    repo, _, revision = uri.partition("@")
    return f"{repo}@{isvc.spec.model.revision or revision or 'main'}"


def cache_key(isvc: InferenceService) -> str:
    """One claim and one Job per model, revision and claim settings (which a claim cannot change)."""
    cache = isvc.spec.model.cache
    identity = f"{model_revision(isvc)}|{cache.storage_class_name}|{cache.access_mode}"
    return hashlib.sha256(identity.encode()).hexdigest()[:10]


def claim_name(isvc: InferenceService) -> str:
    return f"{isvc.metadata.name}-model-{cache_key(isvc)}"


def job_name(isvc: InferenceService) -> str:
    """Within 63 characters: the Job controller copies it into its pods' `job-name` label."""
    return bounded_name(isvc.metadata.name, f"-download-{cache_key(isvc)}")


def download_container(isvc: InferenceService) -> dict[str, Any]:
    """The container that fetches spec.model.uri into MODEL_DIR."""
    uri = isvc.spec.model.uri
    scheme = uri.partition("://")[0]
    if scheme == "hf":
        repo, _, revision = model_revision(isvc).removeprefix("hf://").partition("@")
        image = tool_image(isvc)
        command = ["hf", "download", repo, "--revision", revision, "--local-dir", MODEL_DIR]
    elif scheme == "s3":
        image, command = AWS_CLI_IMAGE, ["aws", "s3", "sync", uri, MODEL_DIR]
    else:  # gs
        image, command = GCLOUD_IMAGE, ["gcloud", "storage", "rsync", "--recursive", uri, MODEL_DIR]
    return {
        "name": "model-download",
        "image": image,
        "command": command,
        "env": base_env(isvc, {"name": "CLOUDSDK_CONFIG", "value": "/tmp/gcloud"}),
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def wait_container(isvc: InferenceService) -> dict[str, Any]:
    """The engine pod's init container: done once the download Job wrote its marker."""
    return {
        "name": "wait-for-model",
        "image": tool_image(isvc),
        "command": ["python", "-c", _WAIT, COMPLETE_MARKER, str(WAIT_SECONDS)],
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True}],
        "securityContext": security_context(),
    }


def model_source(isvc: InferenceService) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """(model volume, model path in the server container, init containers) for spec.model."""
    model = isvc.spec.model
    scheme, _, rest = model.uri.partition("://")
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        return volume, f"{MODEL_DIR}/{path}".rstrip("/"), []
    if scheme == "oci":
        return {"name": "model", "image": {"reference": rest, "pullPolicy": "IfNotPresent"}}, MODEL_DIR, []
    if model.cache is not None:
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim_name(isvc), "readOnly": True}}
        return volume, MODEL_DIR, [wait_container(isvc)]
    empty_dir = {} if model.size is None else {"sizeLimit": model.size}
    return {"name": "model", "emptyDir": empty_dir}, MODEL_DIR, [download_container(isvc)]


def build_model_claim(isvc: InferenceService) -> dict[str, Any]:
    cache = isvc.spec.model.cache
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name is not None:  # "" asks for no class (a pre-provisioned volume)
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": child_metadata(isvc, name=claim_name(isvc)),
        "spec": spec,
    }


def build_download_job(isvc: InferenceService) -> dict[str, Any]:
    """The one-shot download into the claim; the marker is written only after a full download."""
    labels = {
        "app.kubernetes.io/name": DOWNLOAD_POD_NAME,
        "app.kubernetes.io/instance": isvc.metadata.name,
        "app.kubernetes.io/managed-by": MANAGER,
    }
    mark = {
        "name": "mark-complete",
        "image": tool_image(isvc),
        "command": ["python", "-c", _MARK, COMPLETE_MARKER, model_revision(isvc)],
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}],
        "securityContext": security_context(),
    }
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "initContainers": [download_container(isvc)],
        "containers": [mark],
        "volumes": [
            {"name": "model", "persistentVolumeClaim": {"claimName": claim_name(isvc)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    optional = {
        "serviceAccountName": service_account_name(isvc),  # the cloud identity (s3://, gs://)
        "imagePullSecrets": [ref.model_dump(by_alias=True) for ref in isvc.spec.image_pull_secrets],
    }
    pod.update({k: v for k, v in optional.items() if v})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": child_metadata(isvc, name=job_name(isvc)),
        "spec": {
            "backoffLimit": DOWNLOAD_BACKOFF_LIMIT,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def build_cache_children(isvc: InferenceService) -> list[dict[str, Any]]:
    if isvc.spec.model.cache is None:
        return []
    return [build_model_claim(isvc), build_download_job(isvc)]


def cache_state(job: dict[str, Any] | None) -> tuple[str, str, str]:
    """(state, reason, message) of the download Job: state one of cached, downloading, failed."""
    if job is None:
        return "downloading", "CreatingJob", "the download Job does not exist yet"
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return "cached", "Downloaded", f"downloaded by Job {job['metadata']['name']}"
        if condition.get("type") == "Failed":
            message = condition.get("message") or condition.get("reason") or "the download failed"
            return "failed", "DownloadFailed", f"Job {job['metadata']['name']}: {message}"
    failed = status.get("failed") or 0
    message = f"Job {job['metadata']['name']} is downloading"
    return "downloading", "Downloading", message + (f" ({failed} failed attempts)" if failed else "")
