"""`create_app(settings)`: the router's ASGI app (Starlette): the OpenAI surface, /health, /ready,
/metrics; the config watcher and the endpoint prober run beside it while it serves."""

import asyncio
import contextlib
import logging

import httpx
from kvpilot.serving import contract
from kvpilot.serving.api.errors import APIError
from kvpilot.serving.api.protocol import ModelCard, ModelList
from kvpilot.serving.api.request_id import RequestIdMiddleware
from kvpilot.serving.api.streams import cancel_on_disconnect
from kvpilot.serving.router import intake
from kvpilot.serving.router.health import Prober
from kvpilot.serving.router.metering import NO_TENANT
from kvpilot.serving.router.proxy import UPSTREAM_TIMEOUT, Relay, open_upstream, read_whole, record
from kvpilot.serving.router.state import RouterSettings, RouterState
from kvpilot.serving.router.tenants import TenantState
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

logger = logging.getLogger("kvpilot.serving.router")


def create_app(settings: RouterSettings) -> Starlette:
    """The app with its config loaded (ConfigError if the file is bad)."""
    state = RouterState(settings)
    state.reload()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT, limits=limits) as client:
            state.client = client
            prober = Prober(client, state.endpoints, state.release_held, settings.probe_interval)
            state.on_endpoints_changed = prober.wake.set
            tasks = [asyncio.create_task(prober.run()), asyncio.create_task(_watch_config(state))]
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def completions(request: Request) -> Response:
        tenant = None
        try:  # the body is read before the disconnect watcher starts listening on the same channel
            tenant = intake.authenticate(state.loaded.tenants, request.headers.get("authorization"))
            body = await intake.read_body(request, settings.max_body_bytes)
        except APIError as exc:
            _count_refusal(state, None, tenant, exc.status_code)
            raise
        authorization = request.headers.get("authorization")
        forward = _forward(
            state, request.url.path, tenant, body, authorization, request.headers["x-request-id"]
        )
        return await cancel_on_disconnect(request, forward)

    def visible_models(request: Request) -> list[str]:
        tenant = intake.authenticate(state.loaded.tenants, request.headers.get("authorization"))
        return [m.name for m in state.loaded.config.models if tenant is None or tenant.may_use(m.name)]

    async def models(request: Request) -> Response:
        return JSONResponse(
            ModelList(data=[ModelCard(id=name) for name in visible_models(request)]).model_dump()
        )

    async def model(request: Request) -> Response:
        """One model card (the openai client's models.retrieve); the same 404 for a model the
        tenant may not use as for one that does not exist."""
        name = request.path_params["model"]
        if name not in visible_models(request):
            raise intake.model_not_found(name)
        return JSONResponse(ModelCard(id=name).model_dump())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        return JSONResponse({"status": "ready"})  # the app exists only with a loaded config

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route(contract.MODELS_PATH, models, methods=["GET"]),
        Route(contract.MODELS_PATH + "/{model:path}", model, methods=["GET"]),
        Route(contract.HEALTH_PATH, health, methods=["GET"]),
        Route(contract.READY_PATH, ready, methods=["GET"]),
        Route(contract.METRICS_PATH, metrics, methods=["GET"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)
    app.state.router = state
    return app


async def _forward(
    state: RouterState,
    path: str,
    tenant: TenantState | None,
    body: bytes,
    authorization: str | None,
    request_id: str,
) -> Response:
    call = None
    try:
        call = intake.parse_call(path, body, tenant, set(state.loaded.table.models))
        call.request_id, call.authorization = request_id, authorization
        intake.admit(tenant)
        upstream = await open_upstream(state, call)
    except APIError as exc:
        if exc.status_code != 502:  # a 502 was counted with its revision
            _count_refusal(state, call, tenant, exc.status_code)
        raise
    except asyncio.CancelledError:
        _count_refusal(state, call, tenant, 499)
        raise
    if call.stream and upstream.response.status_code == 200:
        return Relay(upstream)
    content, code = await read_whole(upstream)
    return Response(content, status_code=code, headers=upstream.header_dict())


def _count_refusal(
    state: RouterState, call: intake.Call | None, tenant: TenantState | None, code: int
) -> None:
    """A request answered by the router itself (no revision); unknown models are counted as model ""."""
    if call is not None:
        record(state, call, "", code)
    else:
        tenant_name = tenant.tenant.name if tenant is not None else NO_TENANT
        state.metrics.requests.labels("", "", tenant_name, str(code)).inc()


async def _watch_config(state: RouterState) -> None:
    while True:
        await asyncio.sleep(state.settings.reload_interval)
        try:
            if state.changed_on_disk() and state.reload():
                state.release_held()
        except Exception:  # the watcher must outlive any surprise; the last good config stays
            logger.exception("checking the config file failed")


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), type=type_, headers=exc.headers).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("internal error on %s %s", request.method, request.url.path)
    return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()
