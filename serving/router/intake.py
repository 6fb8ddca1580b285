"""What a client request must pass before anything is sent upstream: its key, a body within
`--max-body-bytes` that parses as the server's own request schema, a `model` this router serves
(and the tenant may use), and the tenant's rate limits. Each failure is an OpenAI error body."""

import json
import time
from dataclasses import dataclass

from kvpilot.serving.api.errors import APIError, bad_request, validation_error
from kvpilot.serving.api.protocol import ChatCompletionRequest, CompletionRequest
from kvpilot.serving.router.balancing import prefix_key
from kvpilot.serving.router.metering import NO_TENANT
from kvpilot.serving.router.tenants import RateLimited, Tenants, TenantState
from pydantic import ValidationError
from starlette.requests import Request

SCHEMAS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


@dataclass
class Call:
    """One client request on its way through the router."""

    path: str
    model: str
    tenant: TenantState | None
    body: bytes  # what the upstream gets
    key: str  # the prefix key for the `prefix` policy
    stream: bool
    strip_usage: bool  # the router asked for the usage chunk; the client did not
    started: float
    authorization: str | None = None  # the client's (upstream only without tenants: _upstream_headers)
    request_id: str | None = None  # x-request-id (the client's, or the router's own), sent upstream

    @property
    def tenant_name(self) -> str:
        return self.tenant.tenant.name if self.tenant is not None else NO_TENANT


def authenticate(tenants: Tenants, authorization: str | None) -> TenantState | None:
    """The calling tenant (None when the config has no tenants); 401 for a missing or unknown key."""
    if not tenants.enabled:
        return None
    tenant = tenants.authenticate(authorization)
    if tenant is None:
        raise APIError(
            401,
            "invalid or missing API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


async def read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(
        413,
        f"the request body is larger than {limit} bytes (the router's --max-body-bytes)",
        code="request_too_large",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def model_not_found(model: str) -> APIError:
    # The same answer for a model that does not exist and one the tenant may not use.
    message = f"The model `{model}` does not exist or you do not have access to it."
    return APIError(404, message, param="model", code="model_not_found")


def parse_call(path: str, body: bytes, tenant: TenantState | None, served: set[str]) -> Call:
    """Validate the body with the server's schema; the Call with what the upstream gets."""
    try:
        request = SCHEMAS[path].model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if not request.model:
        raise bad_request("you must provide a model parameter", param="model")
    if request.model not in served or (tenant is not None and not tenant.may_use(request.model)):
        raise model_not_found(request.model)
    data = json.loads(body)
    strip_usage = request.stream and not (request.stream_options and request.stream_options.include_usage)
    if strip_usage:  # meter streams too: ask for the usage chunk, and drop it again on the way back
        data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        body = json.dumps(data).encode()
    return Call(
        path, request.model, tenant, body, prefix_key(data), request.stream, strip_usage, time.monotonic()
    )


def admit(tenant: TenantState | None) -> None:
    """Count the request against its tenant's limits; 429 with Retry-After when over one."""
    if tenant is None:
        return
    try:
        tenant.admit()
    except RateLimited as exc:
        budget = (
            tenant.tenant.requests_per_minute if exc.limit == "requests" else tenant.tenant.tokens_per_minute
        )
        message = (
            f"Rate limit reached for tenant {tenant.tenant.name} on {exc.limit} per minute: limit {budget}. "
            f"Please try again in {exc.retry_after_header}s."
        )
        raise APIError(
            429,
            message,
            type=exc.limit,
            code="rate_limit_exceeded",
            headers={"Retry-After": exc.retry_after_header},
        ) from None
