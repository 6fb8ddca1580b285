"""Every error leaves the server as OpenAI's body `{"error": {"message", "type", "param", "code"}}`."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kvpilot.serving.validation import problems
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in a request and rendered in one place."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        message, param = _printable(message), _printable(param)
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def _printable(text: str | None) -> str | None:
    """Text that encodes as UTF-8 (a lone surrogate a client sent becomes `?`), so that an error
    quoting the client's input can always be sent."""
    return text if text is None else text.encode("utf-8", "replace").decode("utf-8")


def payload_too_large(size: int | None, limit: int) -> APIError:
    got = f"{size} bytes" if size is not None else "more"
    return APIError(
        413,
        f"the request body is too large ({got}; --max-request-bytes is {limit})",
        code="request_too_large",
    )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code=code)


def validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's first error, as `param: message` naming the field (dotted path, list indexes kept)."""
    first = exc.errors()[0]
    problem = problems(exc)[0]
    path = tuple(part for part in problem.path if part != "body")
    if problem.kind == "json_invalid":
        return bad_request(f"invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    if problem.kind == "missing" and not path:
        return bad_request("the request body is empty; expected a JSON object")
    if not path:
        return bad_request(f"the request body must be a JSON object: {problem.message}")
    param = ".".join(path)
    return bad_request(f"{param}: {problem.message}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=type_, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()
