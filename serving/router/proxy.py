"""Forwarding a request upstream and its response back.

`open_upstream` finds a revision (by weight) and an endpoint (by the model's policy), holding the
request in the activation queue while the model has no ready endpoint; a connect error or a 5xx
before the response starts ejects the endpoint and retries once on another endpoint of the same
revision. After that, bytes flow through untouched except for the usage chunk the router asked
for (metered, then dropped when the client did not ask for it). `Relay` streams chunk by chunk and
closes the upstream request when the client disconnects, so the server aborts it. A request
waiting on an endpoint that stopped answering its probes (`Endpoint.lost`) is given up: 502 before
the response started, an error event ending a stream that had.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import httpx
from kvpilot.serving.api.errors import APIError
from kvpilot.serving.api.streams import wait_for_disconnect
from kvpilot.serving.router.activation import QueueFull
from kvpilot.serving.router.endpoints import Endpoint
from kvpilot.serving.router.intake import Call, model_not_found
from kvpilot.serving.router.routing import RevisionRoute
from kvpilot.serving.router.state import RouterState
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("kvpilot.serving.router")
T = TypeVar("T")

UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)
PASSED_HEADERS = ("content-type", "retry-after")
ACTIVATION_RETRY_AFTER = "5"
QUEUE_FULL = 429  # a server's answer when its waiting queue is full (--max-queue-len)


PROMPT_BYTES_PER_TOKEN = 4  # a common estimate for English text (here over the whole JSON body)


def estimated_usage(body: bytes, events: int) -> dict[str, int]:
    """What a stream that ended before its usage chunk is charged (the client left, or the server
    broke): a token per relayed event and one per PROMPT_BYTES_PER_TOKEN bytes of the request, so
    that leaving just before the usage chunk does not make a stream free of tokensPerMinute."""
    return {"prompt_tokens": -(-len(body) // PROMPT_BYTES_PER_TOKEN), "completion_tokens": events}


@dataclass
class Upstream:
    """A request in flight to one endpoint; `finish` must run exactly once."""

    state: RouterState
    call: Call
    revision: RevisionRoute
    endpoint: Endpoint
    response: httpx.Response
    first_byte: float | None = None
    finished: bool = False
    usage_counted: bool = False
    events: int = 0  # data events relayed (a stream's chunks: about a token each)

    def header_dict(self) -> dict[str, str]:
        return {
            name: value for name, value in self.response.headers.items() if name.lower() in PASSED_HEADERS
        }

    def count_usage(self, usage: dict | None) -> None:
        if not usage:
            return
        self.usage_counted = True
        prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        tokens = self.state.metrics.tokens
        tokens.labels(self.call.model, self.call.tenant_name, "prompt").inc(prompt)
        tokens.labels(self.call.model, self.call.tenant_name, "completion").inc(completion)
        if self.call.tenant is not None:
            self.call.tenant.spend_tokens(prompt + completion)

    async def finish(self, code: int) -> None:
        if self.finished:
            return
        self.finished = True
        if self.call.stream and self.events and not self.usage_counted:
            self.count_usage(estimated_usage(self.call.body, self.events))
        await self.response.aclose()
        leave(self.state, self.call, self.revision, self.endpoint)
        record(self.state, self.call, self.revision.name, code, self.first_byte)


def enter(state: RouterState, call: Call, revision: RevisionRoute, endpoint: Endpoint) -> None:
    endpoint.in_flight += 1
    state.metrics.upstream_inflight.labels(call.model, revision.name, endpoint.url).inc()


def leave(state: RouterState, call: Call, revision: RevisionRoute, endpoint: Endpoint) -> None:
    endpoint.in_flight -= 1
    state.metrics.upstream_inflight.labels(call.model, revision.name, endpoint.url).dec()
    state.forget_if_gone(model=call.model, revision=revision.name, endpoint=endpoint.url)


def record(state: RouterState, call: Call, revision: str, code: int, first_byte: float | None = None) -> None:
    metrics = state.metrics
    metrics.requests.labels(call.model, revision, call.tenant_name, str(code)).inc()
    if revision:
        metrics.duration.labels(call.model, revision).observe(time.monotonic() - call.started)
        if first_byte is not None:
            metrics.time_to_first_token.labels(call.model, revision).observe(first_byte - call.started)
    state.forget_if_gone(model=call.model, revision=revision, tenant=call.tenant_name)


async def open_upstream(state: RouterState, call: Call) -> Upstream:
    deadline = None
    held_before = False
    while True:
        table = state.loaded.table.models.get(call.model)
        if table is None:  # removed by a reload while the request waited
            raise model_not_found(call.model)
        activation = table.route.activation
        deadline = deadline or call.started + activation.timeout
        revision = table.choose_revision()
        if revision is not None:
            upstream = await _try_revision(state, call, revision)
            if upstream is not None:
                return upstream
            continue  # its endpoints went away between the choice and the pick: choose again
        if state.closing:
            raise APIError(
                503,
                f"model {call.model} has no ready endpoint and this router is shutting down; retry",
                type="service_unavailable",
                code="no_ready_endpoint",
            )
        try:
            released = await state.activation.wait(
                call.model,
                deadline - time.monotonic(),
                activation.max_queued,
                front=held_before,
                size=len(call.body),
            )
        except QueueFull as full:
            raise APIError(
                429,
                f"model {call.model} is scaling up from zero and {full}; retry later",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": ACTIVATION_RETRY_AFTER},
            ) from None
        if not released:
            raise APIError(
                503,
                f"model {call.model} has no ready endpoint after {activation.timeout:g} s "
                "(scaling up from zero?)",
                type="service_unavailable",
                code="no_ready_endpoint",
            )
        held_before = True


async def _try_revision(state: RouterState, call: Call, revision: RevisionRoute) -> Upstream | None:
    """Up to two endpoints of the revision; None when it had none available at all."""
    tried: list[Endpoint] = []
    failure = ""
    for _ in range(2):
        endpoint = revision.balancer.pick([e for e in revision.available() if e not in tried], call.key)
        if endpoint is None:
            break
        tried.append(endpoint)
        enter(state, call, revision, endpoint)
        request = state.client.build_request(
            "POST",
            endpoint.url + call.path,
            content=call.body,
            headers=_upstream_headers(state, call.authorization, call.request_id),
        )
        try:
            response = await unless_lost(endpoint, state.client.send(request, stream=True))
        except httpx.TransportError as exc:
            leave(state, call, revision, endpoint)
            failure = f"{type(exc).__name__}"
            logger.warning(
                "endpoint %s failed (%s): ejected for %.0f s", endpoint.url, failure, endpoint.eject()
            )
            continue
        except BaseException:
            leave(state, call, revision, endpoint)
            raise
        others = [e for e in revision.available() if e not in tried]
        if response.status_code == QUEUE_FULL and others and len(tried) < 2:
            # That server's queue is full (a burst on it): another may have room. Not a failure.
            await response.aclose()
            leave(state, call, revision, endpoint)
            logger.info("endpoint %s answered 429 (its queue is full): trying another", endpoint.url)
            continue
        if response.status_code < 500:
            endpoint.succeed()
            return Upstream(state, call, revision, endpoint, response)
        cool_down = endpoint.eject()
        logger.warning(
            "endpoint %s answered %d: ejected for %.0f s", endpoint.url, response.status_code, cool_down
        )
        if len(tried) == 2 or not others:
            if _is_json(response):  # nobody else to ask: pass it on (the server's own error body)
                return Upstream(state, call, revision, endpoint, response)
            await response.aclose()  # a proxy's HTML page or an empty body: answered in OpenAI's shape
            leave(state, call, revision, endpoint)
            record(state, call, revision.name, 502)
            raise APIError(
                502,
                f"revision {revision.name} of model {call.model}: the upstream answered HTTP "
                f"{response.status_code} ({response.headers.get('content-type') or 'no content-type'})",
                type="server_error",
                code="upstream_error",
            )
        await response.aclose()
        leave(state, call, revision, endpoint)
        failure = f"HTTP {response.status_code}"
    if not tried:
        return None
    record(state, call, revision.name, 502)
    raise APIError(
        502,
        f"revision {revision.name} of model {call.model}: the upstream failed before answering ({failure})",
        type="server_error",
        code="upstream_unavailable",
    )


def _is_json(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def _upstream_headers(
    state: RouterState, client_authorization: str | None = None, request_id: str | None = None
) -> dict[str, str]:
    """The upstream key where one is configured; else, without tenants, the client's own
    Authorization (servers with their own --api-key then check it); a tenant key never. And the
    request's x-request-id, so the server's answer carries the same id."""
    headers = {"content-type": "application/json"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    if state.loaded.upstream_key is not None:
        headers["authorization"] = f"Bearer {state.loaded.upstream_key}"
    elif client_authorization is not None and not state.loaded.tenants.enabled:
        headers["authorization"] = client_authorization
    return headers


class EndpointLost(httpx.TransportError):
    """The endpoint stopped answering its probes while a request waited on it."""


async def unless_lost(endpoint: Endpoint, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result, or EndpointLost once the endpoint is lost (the awaitable cancelled)."""
    work, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(endpoint.lost.wait())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise EndpointLost(f"{endpoint.url} stopped answering")
    return work.result()


async def read_whole(upstream: Upstream) -> tuple[bytes, int]:
    """A non-streaming response, its usage metered."""
    try:
        content = await unless_lost(upstream.endpoint, upstream.response.aread())
        upstream.first_byte = time.monotonic()
        if upstream.response.status_code == 200:
            with contextlib.suppress(ValueError, AttributeError):
                upstream.count_usage(json.loads(content).get("usage"))
    except EndpointLost as exc:
        await upstream.finish(502)
        raise APIError(
            502,
            f"revision {upstream.revision.name} of model {upstream.call.model}: {exc}",
            type="server_error",
            code="upstream_unavailable",
        ) from None
    except BaseException:
        await upstream.finish(499)
        raise
    await upstream.finish(upstream.response.status_code)
    return content, upstream.response.status_code


DONE_EVENT = b"data: [DONE]\n\n"  # an OpenAI stream's last event


class Relay:
    """An ASGI response streaming the upstream's server-sent events to the client as they come."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.relayed = False  # the client has the whole stream: its last event, or every byte

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream = self.upstream
        code = upstream.response.status_code
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(wait_for_disconnect(receive))
        lost = asyncio.ensure_future(upstream.endpoint.lost.wait())
        try:
            await asyncio.wait({pump, watch, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            given_up = lost.done() and not pump.done()
            for task in (pump, watch, lost):
                task.cancel()
            pumped, *_ = await asyncio.gather(pump, watch, lost, return_exceptions=True)
            if given_up:
                pumped = EndpointLost(f"{upstream.endpoint.url} stopped answering")
                await self._end_with_error(send, upstream, str(pumped))
            if isinstance(pumped, asyncio.CancelledError | OSError) and not self.relayed:
                code = 499  # the client went away before the end (not just before the closing frame)
            elif isinstance(pumped, httpx.HTTPError):  # the upstream broke mid-stream: too late to retry
                cool_down = upstream.endpoint.eject()
                logger.warning(
                    "stream from %s broke (%r): ejected for %.0f s", upstream.endpoint.url, pumped, cool_down
                )
                code = 502
            elif isinstance(pumped, Exception):
                logger.error("relaying from %s failed: %r", upstream.endpoint.url, pumped)
                code = 500
            await upstream.finish(code)

    async def _end_with_error(self, send: Send, upstream: Upstream, message: str) -> None:
        """The stream's last event: an OpenAI-style error (the client's SDK raises it)."""
        error = {"message": message, "type": "server_error", "param": None, "code": "upstream_unavailable"}
        with contextlib.suppress(OSError):  # the client may be gone too
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + json.dumps({"error": error}).encode() + b"\n\n",
                    "more_body": False,
                }
            )

    async def _pump(self, send: Send) -> None:
        upstream = self.upstream
        response = upstream.response
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k.encode(), v.encode()) for k, v in upstream.header_dict().items()],
            }
        )
        is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
        pending = b""
        async for chunk in response.aiter_raw():
            if upstream.first_byte is None:
                upstream.first_byte = time.monotonic()
            if not is_sse:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                continue
            pending = (pending + chunk).replace(b"\r\n", b"\n")  # SSE lines may end in CRLF too
            complete, separator, pending = pending.rpartition(b"\n\n")
            if separator:
                out = b"".join(self._event(event) for event in (complete + separator).split(b"\n\n") if event)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    self.relayed = self.relayed or DONE_EVENT in out  # the rest is the stream's end
        self.relayed = self.relayed or not pending
        await send({"type": "http.response.body", "body": pending, "more_body": False})

    def _event(self, event: bytes) -> bytes:
        """One event as it goes to the client: the usage chunk is metered, and dropped if not asked for."""
        if event.startswith(b"data: {"):
            self.upstream.events += 1
        if b'"usage":{' in event and event.startswith(b"data: "):
            try:
                data = json.loads(event[6:])
            except ValueError:
                return event + b"\n\n"
            if isinstance(data, dict) and data.get("usage") and not data.get("choices"):
                self.upstream.count_usage(data["usage"])
                if self.upstream.call.strip_usage:
                    return b""
        return event + b"\n\n"
