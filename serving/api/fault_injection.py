"""`--inject-error-rate`: a test aid, never for production. A share of the completion requests is
answered with HTTP 500 and an OpenAI error body before the engine sees them (no token generated),
so a rollout's analysis can be shown to roll back a canary whose server fails.

The failures are spread evenly rather than drawn at random: with rate r, request n fails when
floor(n * r) moves past floor((n - 1) * r), so 0.25 fails every fourth request and 1.0 every one.
"""

import math

from kvpilot.serving.api.errors import APIError
from starlette.types import ASGIApp, Receive, Scope, Send

INJECTED_PATHS = ("/v1/completions", "/v1/chat/completions")


class ErrorInjectionMiddleware:
    def __init__(self, app: ASGIApp, rate: float):
        self.app = app
        self.rate = rate
        self.seen = 0

    def should_fail(self) -> bool:
        """Whether the next completion request fails; counts it."""
        self.seen += 1
        return math.floor(self.seen * self.rate) > math.floor((self.seen - 1) * self.rate)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_completion = (
            scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in INJECTED_PATHS
        )
        if is_completion and self.should_fail():
            error = APIError(
                500,
                f"injected error (kvpilot serve --inject-error-rate {self.rate:g}, a test aid)",
                type="server_error",
                code="injected_error",
            )
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
