"""Where a check of a revision reads its figures (pure), and the one piece of rollout I/O that is
not the Kubernetes API: reading those /metrics pages."""

from __future__ import annotations

from typing import Any

import httpx
from kvpilot.operator.autoscaler.scrape import metrics_url
from kvpilot.operator.rollout.observe import pod_is_ready, revision_of

SCRAPE_TIMEOUT_SECONDS = 3.0


def ready_pod_metrics_urls(pods: list[dict[str, Any]]) -> list[str]:
    """The /metrics URL of each ready pod among `pods` (the port its container names `http`)."""
    return [metrics_url(pod) for pod in pods if pod_is_ready(pod)]


def analysis_metrics_urls(
    revision: str, engine_pods: list[dict[str, Any]], router_pods: list[dict[str, Any]] | None
) -> list[str]:
    """The pages a check of `revision` reads: with the router in front (`router_pods` given),
    every ready router pod's, which count the revision's answers by status code (its 5xx too);
    without it, the revision's own ready engine pods'."""
    if router_pods is not None:
        return ready_pod_metrics_urls(router_pods)
    return ready_pod_metrics_urls([pod for pod in engine_pods if revision_of(pod) == revision])


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
