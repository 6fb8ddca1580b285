"""The one piece of rollout I/O that is not the Kubernetes API: reading /metrics pages."""

from __future__ import annotations

from typing import Any

import httpx
from kvpilot.operator.rollout.observe import pod_is_ready
from kvpilot.serving.contract import DEFAULT_PORT, METRICS_PATH

SCRAPE_TIMEOUT_SECONDS = 3.0


def ready_pod_metrics_urls(pods: list[dict[str, Any]]) -> list[str]:
    """The /metrics URL of each ready engine pod among `pods`."""
    return [
        f"http://{pod['status']['podIP']}:{DEFAULT_PORT}{METRICS_PATH}" for pod in pods if pod_is_ready(pod)
    ]


def scrape(urls: list[str]) -> list[str]:
    """The pages that answered; one that does not (a pod going away) is left out of this check."""
    pages = []
    with httpx.Client(timeout=SCRAPE_TIMEOUT_SECONDS) as client:
        for url in urls:
            try:
                response = client.get(url)
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                pages.append(response.text)
    return pages
