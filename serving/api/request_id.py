"""Every response carries `x-request-id`: the client's own (1-128 visible ASCII characters) or a
new one. The openai client reads it into `response._request_id`; the router sends it upstream, so
one id follows a request from the tenant through the router to the server that answered it.

The middleware also puts the id into the request's own headers, so that the code behind it reads
`x-request-id` whether the client sent one or not.
"""

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 128


def request_id_of(headers: list[tuple[bytes, bytes]]) -> bytes:
    given = next((value for name, value in headers if name == HEADER), b"")
    if 0 < len(given) <= MAX_LENGTH and all(0x21 <= byte <= 0x7E for byte in given):
        return given
    return uuid.uuid4().hex.encode()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope["headers"])
        headers = [(name, value) for name, value in scope["headers"] if name != HEADER]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() != HEADER]
                message = {**message, "headers": [*kept, (HEADER, request_id)]}
            await send(message)

        await self.app(dict(scope, headers=[*headers, (HEADER, request_id)]), receive, send_with_id)
