"""A `/v1/*` POST body is read as JSON whatever its `Content-Type` says, as OpenAI's API does.

`curl -d '{...}'` sends `application/x-www-form-urlencoded`, and FastAPI reads a body as JSON only
under a JSON content type: such a body was refused as "not a JSON object" although it is one.

Except from a browser: a page on any site may POST a form, `text/plain` or a typeless body to
this server without asking it first (a CORS "simple request"); read as JSON, it would run
completions on the visitor's local server. Browsers send `Origin` on every POST, scripts and SDKs
do not: a request with `Origin` and a non-JSON content type gets 400 naming the content type to
send (a page's `application/json` request needs a CORS preflight, which this server never grants).
"""

from kvpilot.serving.api.errors import bad_request
from kvpilot.serving.api.gate import API_PREFIX
from starlette.types import ASGIApp, Receive, Scope, Send

JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class JSONBodyMiddleware:
    """Rewrites a non-JSON `Content-Type` of a `/v1/*` POST to `application/json` (pure ASGI)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        content_type = next((value for name, value in headers if name == b"content-type"), b"")
        if is_json(content_type):
            await self.app(scope, receive, send)
            return
        if any(name == b"origin" for name, _ in headers):
            got = content_type.decode("latin-1") or "none"
            error = bad_request(f"the content-type must be application/json (got {got})")
            await error.response()(scope, receive, send)
            return
        headers = [(name, value) for name, value in headers if name != b"content-type"]
        await self.app(dict(scope, headers=[*headers, JSON_CONTENT_TYPE]), receive, send)


def is_json(content_type: bytes) -> bool:
    """`application/json` or a `+json` type, parameters (`; charset=utf-8`) aside."""
    media_type = content_type.split(b";", 1)[0].strip().lower()
    return media_type == b"application/json" or (
        media_type.startswith(b"application/") and media_type.endswith(b"+json")
    )
