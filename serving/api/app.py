"""`create_app(settings)`: the FastAPI app; the engine lives on `app.state.serving`, made in the lifespan."""

import asyncio
import contextlib
import logging
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from kvpilot.serving import contract
from kvpilot.serving.api.body_limit import BodyLimitMiddleware
from kvpilot.serving.api.chat import create_chat_completion
from kvpilot.serving.api.completions import create_completion
from kvpilot.serving.api.errors import install_error_handlers
from kvpilot.serving.api.fault_injection import ErrorInjectionMiddleware
from kvpilot.serving.api.gate import GateMiddleware
from kvpilot.serving.api.json_body import JSONBodyMiddleware
from kvpilot.serving.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from kvpilot.serving.api.request_id import RequestIdMiddleware
from kvpilot.serving.api.settings import ServeSettings
from kvpilot.serving.api.state import ServingState
from kvpilot.serving.api.streams import cancel_on_disconnect
from prometheus_client import CONTENT_TYPE_LATEST

logger = logging.getLogger("kvpilot.serving.api")


def kvpilot_version() -> str:
    try:
        return version("kvpilot")
    except PackageNotFoundError:
        return "unknown"


def create_app(settings: ServeSettings) -> FastAPI:
    state = ServingState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so /health answers (and /ready says 503) while the model loads.
        loading = asyncio.create_task(state.load(), name="kvpilot-load")
        loading.add_done_callback(_log_load_failure)
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await state.shutdown()

    app = FastAPI(title="kvpilot", version=kvpilot_version(), lifespan=lifespan)
    app.state.serving = state
    install_error_handlers(app)
    # The last added runs first: the gate (API key, readiness) before any body is read.
    app.add_middleware(JSONBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.inject_error_rate > 0:  # a test aid: failures after the gate, before the engine
        app.add_middleware(ErrorInjectionMiddleware, rate=settings.inject_error_rate)
    app.add_middleware(GateMiddleware, state=state)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries it, refusals too

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await cancel_on_disconnect(request, create_completion(body, state))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await cancel_on_disconnect(request, create_chat_completion(body, state))

    def model_card() -> ModelCard:
        max_model_len = state.model_info.max_model_len if state.model_info is not None else None
        return ModelCard(id=state.model_name, root=settings.model_path, max_model_len=max_model_len)

    @app.get(contract.MODELS_PATH)
    async def models() -> ModelList:
        return ModelList(data=[model_card()])

    # `:path`: a served name may hold slashes (`--model /models/x` without --served-model-name).
    @app.get(contract.MODELS_PATH + "/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        state.check_model(model_id)  # an unknown id: 404 model_not_found, as OpenAI answers
        return model_card()

    @app.get(contract.HEALTH_PATH)
    async def health() -> Response:
        if state.load_error is not None or (state.engine is not None and not state.engine.is_running):
            return JSONResponse({"status": "error"}, status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get(contract.READY_PATH)
    async def ready() -> Response:
        if state.ready:
            return JSONResponse({"status": "ready"})
        status = "draining" if state.draining else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get(contract.METRICS_PATH)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": kvpilot_version()}

    return app


def _log_load_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("model loading failed: /ready stays 503, /health answers 500; `kvpilot serve` exits 1")
