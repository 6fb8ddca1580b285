"""Reading the pods' /metrics: which pods count, what their text says, and one Sample from it all.

Parsing and sampling are pure; `fetch_metrics` is the only I/O (one short GET per pod, in parallel;
a pod that does not answer in time is simply left out).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from kvpilot.operator.autoscaler.policy import Sample
from kvpilot.serving.contract import (
    DEFAULT_PORT,
    METRIC_KV_CACHE_USAGE,
    METRIC_NUM_REQUESTS_RUNNING,
    METRIC_NUM_REQUESTS_WAITING,
    METRIC_ROUTER_QUEUED_REQUESTS,
    METRICS_PATH,
    PORT_NAME,
    ROUTER_MODEL_LABEL,
)
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class EngineReading:
    running: float
    waiting: float
    kv_cache_usage: float


def _values(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    values: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, []).append((sample.labels, sample.value))
    return values


def parse_engine_metrics(text: str) -> EngineReading | None:
    """One engine pod's gauges; None when the text is not an engine's /metrics."""
    try:
        values = _values(text)
    except ValueError:
        return None
    names = (METRIC_NUM_REQUESTS_RUNNING, METRIC_NUM_REQUESTS_WAITING, METRIC_KV_CACHE_USAGE)
    if not all(values.get(name) for name in names):
        return None
    running, waiting, usage = (sum(value for _, value in values[name]) for name in names)
    return EngineReading(running=running, waiting=waiting, kv_cache_usage=usage)


def parse_router_queued(text: str, model: str) -> float | None:
    """The router's queued requests for this model (0 when it exports the gauge for others only)."""
    try:
        samples = _values(text).get(METRIC_ROUTER_QUEUED_REQUESTS)
    except ValueError:
        return None
    if samples is None:
        return None
    return sum(value for labels, value in samples if labels.get(ROUTER_MODEL_LABEL) == model)


def _ready_since(pod: dict[str, Any]) -> datetime.datetime | None:
    status = pod.get("status") or {}
    if not status.get("podIP") or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") == "True":
            stamp = condition.get("lastTransitionTime")
            if not stamp:
                return datetime.datetime.min.replace(tzinfo=datetime.UTC)
            return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return None


def metrics_url(pod: dict[str, Any]) -> str:
    """http://POD_IP:PORT/metrics, PORT being the container port named `http` (else the default)."""
    ports = [p for c in pod["spec"].get("containers") or [] for p in c.get("ports") or []]
    port = next((p["containerPort"] for p in ports if p.get("name") == PORT_NAME), DEFAULT_PORT)
    return f"http://{pod['status']['podIP']}:{port}{METRICS_PATH}"


def counted_pods(pods: Sequence[dict[str, Any]], now: float, initial_delay: float) -> list[dict[str, Any]]:
    """Pods that are Ready, not terminating, and have been Ready for `initial_delay` seconds."""
    counted = []
    for pod in pods:
        since = _ready_since(pod)
        if since is not None and now - since.timestamp() >= initial_delay:
            counted.append(pod)
    return counted


def build_sample(
    t: float, ready: int, readings: Sequence[EngineReading | None], queued: float | None, current: int
) -> Sample:
    """One Sample of the InferenceService. Pods that did not answer are represented by those that
    did (sums scaled up by ready/answered); none answering means the engines were not measured,
    except at zero replicas, where nothing runs."""
    answered = [r for r in readings if r is not None]
    if ready == 0 and current == 0:
        return Sample(t=t, ready_replicas=0, running=0.0, waiting=0.0, kv_cache_usage=0.0, queued=queued)
    if not answered:
        return Sample(t=t, ready_replicas=ready, queued=queued)
    scale = ready / len(answered)
    return Sample(
        t=t,
        ready_replicas=ready,
        running=sum(r.running for r in answered) * scale,
        waiting=sum(r.waiting for r in answered) * scale,
        kv_cache_usage=sum(r.kv_cache_usage for r in answered) / len(answered),
        queued=queued,
    )


async def fetch_metrics(http: httpx.AsyncClient, urls: Sequence[str]) -> list[str | None]:
    """Each URL's text, None for any that failed or did not answer within the timeout."""

    async def one(url: str) -> str | None:
        try:
            response = await http.get(url, timeout=SCRAPE_TIMEOUT_SECONDS)
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    return list(await asyncio.gather(*(one(url) for url in urls)))
