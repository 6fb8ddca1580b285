"""Tool calling in chat completions: what the template sees, what the grammar enforces, which
parser reads the reply.

- `tool_choice: "auto"` (the default with tools): the model decides; its reply is parsed in its
  family's format (`tool_parsers.py`), chosen from the chat template.
- `"none"`: tools are shown to the model, the reply is plain content.
- `"required"` and a named function: the structured-output grammar enforces the call, so the
  arguments always parse and match the function's `parameters` schema.

A template that knows nothing of tools (it never reads `tools`, like SmolLM2's) gets them in the
system message in the Hermes format, and the reply is parsed as Hermes.
"""

import json
from dataclasses import dataclass
from typing import Any

from kvpilot.serving.api.errors import bad_request
from kvpilot.serving.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    random_id,
)
from kvpilot.serving.api.tool_parsers import ToolCallParser
from kvpilot.serving.structured_outputs import (
    StructuredOutputsParams,
    check_json_schema,
    check_well_formed,
)
from kvpilot.serving.validation import InvalidParameter

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
HERMES_SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolPlan:
    template_tools: list[dict[str, Any]] | None  # for the template's `tools` (None: in the system prompt)
    system_prompt: str | None  # the Hermes tool prompt when the template has no tools support
    parser: ToolCallParser | None  # None: the reply is plain content (tool_choice "none")
    structured: StructuredOutputsParams | None  # the grammar that enforces the call


def tool_format(chat_template: str) -> str | None:
    """The tool-call format a chat template teaches its model; None if it has no tools support."""
    if "tools" not in chat_template:
        return None
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return "hermes"


def plan_tools(request: ChatCompletionRequest, chat_template: str) -> ToolPlan | None:
    """None when the request has no tools; a 400 naming the field for a bad tool or choice."""
    tools, choice = request.tools or [], request.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None
    names = [tool.function.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise bad_request(f"tools: function names must be unique, repeated: {duplicates}", param="tools")
    choice = choice or "auto"
    enforced = choice == "required" or not isinstance(choice, str)
    parameters = {}
    for index, tool in enumerate(tools):
        schema = tool.function.parameters or NO_ARGUMENTS
        try:
            if enforced:
                check_json_schema(schema, f"tools[{index}].function.parameters")
            else:
                check_well_formed(schema, f"tools[{index}].function.parameters")
        except InvalidParameter as exc:
            raise bad_request(str(exc), param=exc.param) from None
        parameters[tool.function.name] = schema
    wants_format = request.response_format is not None and request.response_format.type != "text"
    if enforced and (wants_format or request.structured_outputs is not None):
        raise bad_request(
            "response_format / structured_outputs cannot be combined with tool_choice 'required' or a "
            "named function (the tool call is the structured output)",
            param="tool_choice",
        )
    native = tool_format(chat_template)
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
    system_prompt = None
    if native is None:
        system_prompt = HERMES_SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t) for t in template_tools))
        template_tools = None
    if choice == "none":
        return ToolPlan(template_tools, system_prompt, None, None)
    if choice == "auto":
        return ToolPlan(template_tools, system_prompt, ToolCallParser(native or "hermes"), None)
    if choice == "required":
        schema = _required_schema(parameters, request.parallel_tool_calls)
        structured = _params(schema, "tools")
        return ToolPlan(template_tools, system_prompt, ToolCallParser("required"), structured)
    name = choice.function.name
    if name not in parameters:
        raise bad_request(f"tool_choice: no tool is named {name!r} (tools: {names})", param="tool_choice")
    structured = _params(parameters[name], f"tools[{names.index(name)}].function.parameters")
    return ToolPlan(template_tools, system_prompt, ToolCallParser("named", name), structured)


def conversation(messages: list[ChatMessage], system_prompt: str | None) -> list[dict[str, Any]]:
    """Messages as chat templates read them (HF's convention): an assistant's tool calls with
    arguments as objects, a tool message with its `tool_call_id`; the tool prompt (if any)
    leads the system message."""
    result = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.text}
        if message.name:
            entry["name"] = message.name
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in message.tool_calls
            ]
            if system_prompt is not None:  # the template cannot write calls: write them as text
                calls = [call["function"] for call in entry["tool_calls"]]
                written = "\n".join(f"<tool_call>\n{json.dumps(call)}\n</tool_call>" for call in calls)
                entry["content"] = f"{entry['content']}\n{written}" if entry["content"] else written
        result.append(entry)
    if system_prompt is not None:
        if result and result[0]["role"] in ("system", "developer"):
            result[0]["content"] = f"{result[0]['content']}\n\n{system_prompt}"
        else:
            result.insert(0, {"role": "system", "content": system_prompt})
    return result


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _required_schema(parameters: dict[str, dict], parallel: bool) -> dict:
    """vLLM's: an array of {"name", "parameters"}, one object per call, each naming a tool."""
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "const": name}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, schema in parameters.items()
        ]
    }
    return {"type": "array", "items": call, "minItems": 1} | ({} if parallel else {"maxItems": 1})


def _params(schema: dict, param: str) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=json.dumps(schema), param=param)


def message_parts(parser: ToolCallParser | None, text: str) -> tuple[str | None, list[ToolCall]]:
    """A finished reply as the message's `content` and `tool_calls`."""
    if parser is None:
        return text, []
    parsed = parser.parse(text, finished=True)
    calls = [ToolCall(function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.calls]
    return (parsed.content or None) if calls else parsed.content, calls


def finish_reason(parser: ToolCallParser | None, reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's "tool_calls" when the model chose to call (not for a named tool_choice: "stop")."""
    if has_calls and reason == "stop" and parser is not None and parser.kind != "named":
        return "tool_calls"
    return reason


class ToolCallDeltas:
    """One choice's stream: content and tool-call deltas from its cumulative text."""

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self.content_sent = 0
        self.calls_sent = 0
        self.arguments_sent = 0  # named tool_choice: the arguments stream as they come

    def delta(self, text: str, finished: bool) -> tuple[str | None, list[DeltaToolCall]]:
        if self.parser.kind == "named":
            calls = []
            if self.calls_sent == 0:
                self.calls_sent = 1
                name = DeltaFunctionCall(name=self.parser.function_name, arguments="")
                calls.append(DeltaToolCall(index=0, id=random_id("call"), type="function", function=name))
            if len(text) > self.arguments_sent:
                arguments = DeltaFunctionCall(arguments=text[self.arguments_sent :])
                calls.append(DeltaToolCall(index=0, function=arguments))
                self.arguments_sent = len(text)
            return None, calls
        parsed = self.parser.parse(text, finished)
        content = parsed.content[self.content_sent :] or None
        self.content_sent = max(self.content_sent, len(parsed.content))
        calls = [
            DeltaToolCall(
                index=index,
                id=random_id("call"),
                type="function",
                function=DeltaFunctionCall(name=call.name, arguments=call.arguments),
            )
            for index, call in enumerate(parsed.calls)
            if index >= self.calls_sent
        ]
        self.calls_sent = max(self.calls_sent, len(parsed.calls))
        return content, calls

    @property
    def has_calls(self) -> bool:
        return self.calls_sent > 0
