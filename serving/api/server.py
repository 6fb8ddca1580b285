"""Run the app under uvicorn with kvpilot's own SIGTERM handling: drain first, then exit 0."""

import asyncio
import contextlib
import logging
import signal
import socket

import uvicorn
from kvpilot.serving.api.app import create_app
from kvpilot.serving.api.settings import ServeSettings
from kvpilot.serving.api.termination import write_termination_reason

logger = logging.getLogger("kvpilot.serving.api")


class _Server(uvicorn.Server):
    """uvicorn's own handler stops listening at once; ours keeps answering 503 while requests drain."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def run_server(settings: ServeSettings, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM/SIGINT (drained) or a failed model load; the process exit code. A failed
    load leaves its reason in the termination log."""
    return asyncio.run(serve(settings, sock))


async def serve(settings: ServeSettings, sock: socket.socket | None = None) -> int:
    app = create_app(settings)
    state = app.state.serving
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=settings.access_log,
        lifespan="on",
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def drain_then_exit() -> None:
        await state.drain(settings.shutdown_timeout)
        server.should_exit = True

    def on_signal(sig: signal.Signals) -> None:
        if state.draining:  # a second signal: stop now
            logger.warning("%s again: exiting without waiting", sig.name)
            server.force_exit = server.should_exit = True
            return
        logger.info("%s: draining (up to %.0f s), /ready now 503", sig.name, settings.shutdown_timeout)
        task = loop.create_task(drain_then_exit())
        tasks.add(task)

    async def exit_on_load_failure() -> None:
        while state.load_error is None and not state.ready:
            await asyncio.sleep(0.1)
        if state.load_error is not None:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    watcher = loop.create_task(exit_on_load_failure())
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        watcher.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if state.load_error is not None:
        reason = f"kvpilot serve: cannot load the model {settings.model_path}: {state.load_error}"
        write_termination_reason(settings.termination_log, reason)
        return 1
    return 0
