"""The door of `/v1/*`: API key, then readiness/draining, before any body is read; counts what it lets in."""

import hmac

from kvpilot.serving.api.errors import APIError
from kvpilot.serving.api.state import ServingState
from starlette.types import ASGIApp, Receive, Scope, Send

API_PREFIX = "/v1/"


class GateMiddleware:
    """A pure ASGI middleware (BaseHTTPMiddleware would get between streaming responses and disconnects)."""

    def __init__(self, app: ASGIApp, state: ServingState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            self._check_api_key(scope)
            if scope["method"] == "POST":
                self.state.check_ready()
        except APIError as exc:
            await exc.response()(scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        self.state.num_accepted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.num_accepted -= 1

    def _check_api_key(self, scope: Scope) -> None:
        api_key = self.state.settings.api_key
        if not api_key:
            return
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "invalid or missing API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
