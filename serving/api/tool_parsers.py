"""Model output as OpenAI `tool_calls`, for the formats the supported model families write.

- `hermes` (Hermes, Qwen 2/2.5/3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  any number of them, after optional text.
- `llama3_json` (Llama 3.1+): the whole reply is `{"name": ..., "parameters": {...}}`, several
  separated by `;` (the `<|python_tag|>` before them is a special token, already left out). A
  reply that starts with `{` is held back while streaming until it ends.
- `required`: what `tool_choice: "required"` constrains the output to, a JSON array of
  `{"name": ..., "parameters": {...}}` (vLLM's format: the same for every model family).
- `named`: a named `tool_choice`; the whole output is the arguments of that function.

`ToolCallParser.parse(text, finished)` reads the cumulative text and says what may be shown so
far: content up to where a call may start, and every call that is complete. Streaming sends the
difference between two calls; a whole reply is one call with finished=True.
"""

import json
import re
from dataclasses import dataclass, field

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ParsedOutput:
    content: str  # text for `content` ("" if none)
    calls: list[ParsedCall] = field(default_factory=list)


class ToolCallParser:
    def __init__(self, kind: str, function_name: str | None = None) -> None:
        if kind not in ("hermes", "llama3_json", "required", "named"):
            raise ValueError(f"unknown tool call format {kind!r}")
        self.kind = kind
        self.function_name = function_name

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        if self.kind == "hermes":
            return _parse_hermes(text, finished)
        if self.kind == "llama3_json":
            return _parse_llama3(text, finished)
        if self.kind == "required":
            return ParsedOutput("", _calls(_complete_values(text.lstrip().removeprefix("["), ",]")))
        if not finished:  # named: arguments stream as they come (see `arguments_so_far`)
            return ParsedOutput("")
        return ParsedOutput("", [ParsedCall(self.function_name, text)])


def _parse_hermes(text: str, finished: bool) -> ParsedOutput:
    start = text.find(HERMES_START)
    if start < 0:
        if finished:
            return ParsedOutput(text)
        return ParsedOutput(text[: len(text) - _partial_suffix(text, HERMES_START)])
    blocks = [m.group(1) for m in _HERMES_BLOCK.finditer(text, start)]
    if finished:  # a reply may end (at EOS) without closing its last call
        last = text.rfind(HERMES_START)
        if text.find(HERMES_END, last) < 0:
            blocks.append(text[last + len(HERMES_START) :].strip())
    calls = []
    for block in blocks:
        value = _json_or_none(block)
        call = _as_call(value, "arguments") if value is not None else None
        if call is None and not calls:  # not a call after all: show the model's text as it is
            return ParsedOutput(text) if finished else ParsedOutput(text[:start])
        if call is not None:  # (a broken call after good ones is dropped: those were sent)
            calls.append(call)
    return ParsedOutput(text[:start], calls)


def _parse_llama3(text: str, finished: bool) -> ParsedOutput:
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        if not finished and not stripped:
            return ParsedOutput("")
        return ParsedOutput(text)
    if not finished:  # whether it is all calls shows only at the end: held until then
        return ParsedOutput("")
    values = _complete_values(stripped, ";")
    calls = _calls(values, "parameters")
    if len(calls) != len(values) or not calls or _rest_after(stripped, len(values)).strip():
        return ParsedOutput(text)  # not (only) calls: the model's text as it is
    return ParsedOutput("", calls)


def _complete_values(text: str, separators: str) -> list:
    """The JSON values at the start of `text` that are complete, separated by whitespace or any
    character in `separators`."""
    values, position = [], 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in separators):
            position += 1
        try:
            value, position = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError:
            return values
        values.append(value)


def _rest_after(text: str, num_values: int) -> str:
    position = 0
    for _ in range(num_values):
        while text[position].isspace() or text[position] == ";":
            position += 1
        _, position = _DECODER.raw_decode(text, position)
    return text[position:].lstrip().lstrip(";")


def _calls(values: list, arguments_key: str = "parameters") -> list[ParsedCall]:
    calls = [_as_call(v, arguments_key) for v in values]
    return [c for c in calls if c is not None]


def _as_call(value, arguments_key: str) -> ParsedCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    return ParsedCall(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a beginning of `tag` (held back while streaming)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0
