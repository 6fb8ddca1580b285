"""Bad input, named: one error type for the engine's checks and one reading of pydantic's errors.

The engine, its configuration and `SamplingParams` raise `InvalidParameter(param, message)`;
each edge renders it its own way (the CLI names the flag, the HTTP API fills OpenAI's `param`,
the operator writes a status condition). `problems(error)` turns a pydantic `ValidationError`
into the same (path, message) pairs for all of them. Imports nothing heavy: the operator uses it.
"""

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's error code for a prompt too long


class InvalidParameter(ValueError):
    """`param` is the name the caller used (a request field, an engine setting); `code` a
    machine-readable kind where OpenAI's API has one (e.g. `context_length_exceeded`)."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Problem:
    path: tuple[str, ...]  # field names and list indexes, outermost first; () for the whole input
    message: str
    value: Any = None  # the rejected input, when pydantic kept it
    kind: str = ""  # pydantic's error type, e.g. "missing", "json_invalid"

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def problems(error: ValidationError) -> list[Problem]:
    """Every problem of a validation error (pydantic's, or FastAPI's request error of the same
    shape). An `InvalidParameter` raised inside a validator adds its `param` to the path, and
    its message loses pydantic's "Value error, " prefix."""
    found = []
    for item in error.errors():
        path = tuple(str(part) for part in item.get("loc", ()))
        message = item["msg"].removeprefix("Value error, ")
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidParameter):
            path, message = (*path, cause.param), cause.message
        found.append(Problem(path, message, item.get("input"), item.get("type", "")))
    return found
