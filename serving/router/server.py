"""Run the router under uvicorn, with one step added to its SIGTERM: answer the held requests."""

import asyncio
import contextlib
from types import FrameType

import uvicorn
from kvpilot.serving.router.state import RouterState
from starlette.applications import Starlette


class RouterServer(uvicorn.Server):
    """uvicorn's shutdown (stop listening, let the requests in flight finish), after the requests
    held for scale from zero got their 503: they would wait out activation.timeout, past the pod's
    grace period, and lose their connection instead."""

    def __init__(self, config: uvicorn.Config, state: RouterState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeError):  # a signal before the loop runs: nothing is held
            asyncio.get_running_loop().call_soon_threadsafe(self.state.stop_holding)
        super().handle_exit(sig, frame)


def run_router(app: Starlette, host: str, port: int, access_log: bool) -> None:
    config = uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level="info")
    RouterServer(config, app.state.router).run()
