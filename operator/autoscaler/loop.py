"""The thin loop: every INTERVAL_SECONDS, for each InferenceService with `autoscaling.engine: kvpilot`,
gather (the serving revision's Deployment's replicas, the Ready engine pods' and the router pods'
/metrics), decide (`decision.decide`), write (that Deployment's replicas under its own field
manager, an Event) and report (status.autoscaling).

During a rollout (`rollout.state.autoscaled_revision` is None) the loop decides the total as
usual but writes no Deployment: status.autoscaling.desiredReplicas is the total the rollout
planner shares between the revisions by weight (`rollout.replicas.split_replicas`).

One asyncio task for all InferenceServices (kopf's timers and daemons would put a finalizer on
every object, and the operator has none). The samples and the decision state live in memory; a
restarted operator starts conservatively (`State.start`) from what status.autoscaling recorded.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from kvpilot.operator.api import API_VERSION, KIND, InferenceService, RolloutStatus
from kvpilot.operator.autoscaler.decision import STABLE, Decision, State, decide
from kvpilot.operator.autoscaler.policy import Policy, Sample
from kvpilot.operator.autoscaler.report import ScaleWrite, autoscaling_status, worth_writing
from kvpilot.operator.autoscaler.scrape import (
    build_sample,
    counted_pods,
    fetch_metrics,
    metrics_url,
    parse_engine_metrics,
    parse_router_queued,
)
from kvpilot.operator.executor import KubeClient, PermanentApiError, TransientError
from kvpilot.operator.labels import AUTOSCALER_MANAGER, router_selector_string, selector_string
from kvpilot.operator.revision import revision_deployment_name
from kvpilot.operator.rollout.state import autoscaled_revision
from pydantic import ValidationError

INTERVAL_SECONDS = 2.0
VALUE_REFRESH_SECONDS = 10.0  # a status write for a changed currentValue alone, at most this often
RECORD_ENV = "KVPILOT_AUTOSCALER_RECORD_DIR"  # `kvpilot operator --record-samples DIR`

log = logging.getLogger(__name__)


def _wants_autoscaler(body: dict[str, Any]) -> bool:
    """Before parsing (an invalid spec is still tracked; its tick skips it until it is fixed)."""
    autoscaling = (body.get("spec") or {}).get("autoscaling")
    return isinstance(autoscaling, dict) and autoscaling.get("engine", "kvpilot") == "kvpilot"


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def scale_event(isvc: InferenceService, before: int, after: int, mode: str, reason: str, t: float) -> dict:
    stamp = rfc3339(t)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{isvc.metadata.name}.", "namespace": isvc.metadata.namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": isvc.metadata.name,
            "namespace": isvc.metadata.namespace,
            "uid": isvc.metadata.uid,
        },
        "type": "Normal",
        "reason": "SuccessfulRescale",
        "message": f"scaled from {before} to {after} ({mode}): {reason}"[:1024],
        "source": {"component": AUTOSCALER_MANAGER},
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


@dataclass
class Tracked:
    """One autoscaled InferenceService: its latest body and what the loop remembers about it."""

    body: dict[str, Any]
    samples: deque[Sample] = field(default_factory=deque)
    state: State | None = None
    written: dict[str, Any] | None = None  # the status.autoscaling this loop last decided on
    unsaved: bool = False  # writing `written` failed: try again
    value_written_at: float = 0.0


class Autoscaler:
    """The loop over every tracked InferenceService; `observe` is fed by the watch."""

    def __init__(
        self,
        client: Callable[[], KubeClient],
        clock: Callable[[], float] = time.time,
        interval: float = INTERVAL_SECONDS,
        record_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.interval = interval
        self.record_dir = record_dir  # each sample appended to NAMESPACE_NAME.jsonl, for the replay
        self.tracked: dict[tuple[str, str], Tracked] = {}

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        metadata = body.get("metadata") or {}
        key = (metadata.get("namespace", "default"), metadata.get("name", ""))
        if event_type == "DELETED" or metadata.get("deletionTimestamp") or not _wants_autoscaler(body):
            self.tracked.pop(key, None)
        elif key in self.tracked:
            self.tracked[key].body = body
        else:
            self.tracked[key] = Tracked(body=body)

    async def run(self) -> None:
        async with httpx.AsyncClient() as http:
            while True:
                started = self.clock()
                await asyncio.gather(*(self._tick_safely(http, key) for key in list(self.tracked)))
                await asyncio.sleep(max(0.0, self.interval - (self.clock() - started)))

    async def _tick_safely(self, http: httpx.AsyncClient, key: tuple[str, str]) -> None:
        try:
            await self.tick(http, key)
        except (TransientError, PermanentApiError) as exc:
            log.warning(f"autoscaler: {key[0]}/{key[1]}: {exc}")
        except Exception:
            log.exception(f"autoscaler: {key[0]}/{key[1]}: unexpected error")

    async def tick(self, http: httpx.AsyncClient, key: tuple[str, str]) -> None:
        """One round for one InferenceService: gather, decide, write, report."""
        tracked = self.tracked.get(key)
        if tracked is None:
            return
        try:
            isvc = InferenceService.from_body(tracked.body)
        except ValidationError:
            return  # the reconciler reports the invalid spec
        assert isvc.spec.autoscaling is not None
        policy = Policy.from_spec(isvc.spec.autoscaling)
        client = self.client()
        rollout = (tracked.body.get("status") or {}).get("rollout")
        if not rollout:
            return  # the reconciler has not created the first revision yet
        revision = autoscaled_revision(RolloutStatus.model_validate(rollout))
        recorded = (tracked.written or (tracked.body.get("status") or {}).get("autoscaling") or {}).get(
            "desiredReplicas"
        )
        if revision is None:  # a rollout shares the total: decide it, the rollout planner splits it
            current = recorded if recorded is not None else rollout.get("replicas") or 0
        else:
            deployment = await asyncio.to_thread(
                client.get_deployment, key[0], revision_deployment_name(isvc, revision)
            )
            if deployment is None:
                return  # the reconciler creates it; nothing to scale yet
            current = (deployment.get("spec") or {}).get("replicas", 1)
        now = self.clock()
        sample = await self._sample(http, client, isvc, policy, current, now)
        tracked.samples.append(sample)
        if self.record_dir is not None:
            with (self.record_dir / f"{key[0]}_{key[1]}.jsonl").open("a") as record:
                record.write(json.dumps(sample.to_record()) + "\n")
        while tracked.samples and tracked.samples[0].t <= now - policy.stable_window:
            tracked.samples.popleft()

        previous = tracked.written or ((tracked.body.get("status") or {}).get("autoscaling") or {})
        state = tracked.state or State.start(now, current, previous.get("mode", STABLE))
        decision = decide(policy, list(tracked.samples), current, now, state)
        tracked.state = decision.state
        write = ScaleWrite(True, "ReadyForNewScale", "the autoscaler can set the Deployment's replicas")
        if decision.desired != current:
            write = await self._scale(client, isvc, revision, current, decision, now)

        generation, stamp = isvc.metadata.generation, rfc3339(now)
        status = autoscaling_status(decision, policy.metric, current, write, previous, generation, stamp)
        value_due = now - tracked.value_written_at >= VALUE_REFRESH_SECONDS
        if tracked.unsaved or worth_writing(status, previous, value_due):
            tracked.written, tracked.unsaved = status, True
            cleared = dict.fromkeys(("currentValue", "lastScaleTime"))  # merge patch: absent keys go
            await asyncio.to_thread(client.patch_status, *key, {"autoscaling": {**cleared, **status}})
            tracked.unsaved, tracked.value_written_at = False, now

    async def _sample(
        self,
        http: httpx.AsyncClient,
        client: KubeClient,
        isvc: InferenceService,
        policy: Policy,
        current: int,
        now: float,
    ) -> Sample:
        """The Ready engine pods' gauges and the router pods' queued requests, scraped now."""
        namespace = isvc.metadata.namespace
        pods = await asyncio.to_thread(client.list_pods, namespace, selector_string(isvc))
        routers = await asyncio.to_thread(client.list_pods, namespace, router_selector_string(isvc))
        engines = counted_pods(pods, now, policy.initial_delay)
        texts = await fetch_metrics(http, [metrics_url(p) for p in engines + counted_pods(routers, now, 0.0)])
        readings = [parse_engine_metrics(text) if text else None for text in texts[: len(engines)]]
        model = isvc.spec.model.name
        queued = [parse_router_queued(text, model) for text in texts[len(engines) :] if text]
        answered = [q for q in queued if q is not None]
        return build_sample(now, len(engines), readings, sum(answered) if answered else None, current)

    async def _scale(
        self,
        client: KubeClient,
        isvc: InferenceService,
        revision: str | None,
        current: int,
        decision: Decision,
        now: float,
    ) -> ScaleWrite:
        """Set the serving revision's Deployment's replicas and post an Event. During a rollout
        (`revision` None) the decision goes to status only: the rollout planner shares it out."""
        namespace, name = isvc.metadata.namespace, isvc.metadata.name
        if revision is not None:
            deployment = revision_deployment_name(isvc, revision)
            try:
                await asyncio.to_thread(
                    client.apply_replicas, namespace, deployment, decision.desired, AUTOSCALER_MANAGER
                )
            except (TransientError, PermanentApiError) as exc:
                return ScaleWrite(False, "FailedUpdateScale", str(exc))
        log.info(f"autoscaler: {namespace}/{name}: {current} -> {decision.desired}: {decision.reason}")
        event = scale_event(isvc, current, decision.desired, decision.mode, decision.reason, now)
        await asyncio.to_thread(client.create_event, event)
        return ScaleWrite(True, "SucceededRescale", f"scaled from {current} to {decision.desired}")
