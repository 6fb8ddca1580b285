"""OpenAI request and response bodies (with vLLM's extra sampling fields), validated at the edge."""

import functools
import re
import time
import uuid
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

LONE_SURROGATE = "lone_surrogate"  # pydantic error type of a str that is not valid Unicode
_SURROGATE = re.compile("[\ud800-\udfff]")


def _first_lone_surrogate(value: Any) -> PydanticCustomError | None:
    """JSON may carry `"\\ud800"`: a UTF-16 half that no tokenizer or UTF-8 encoder accepts.
    (A valid pair such as `"\\ud83d\\ude00"` arrives joined into one character.)"""
    if isinstance(value, str):
        if (match := _SURROGATE.search(value)) is None:
            return None
        return PydanticCustomError(
            LONE_SURROGATE,
            "contains a lone UTF-16 surrogate (\\u{code}) at character {index}; send valid Unicode",
            {"code": f"{ord(match.group()):04x}", "index": match.start()},
        )
    if isinstance(value, dict):
        value = [item for pair in value.items() for item in pair]
    # Validated lists are of one type: a list of numbers (token ids) has no text to look at.
    if isinstance(value, list | tuple) and value and not isinstance(value[0], int | float):
        return next(filter(None, map(_first_lone_surrogate, value)), None)
    return None


class RequestModel(BaseModel):
    """A request body (or part of one): every text in every field must be valid Unicode (a 400
    naming the field, rather than a tokenizer's TypeError or a response that cannot be encoded),
    and `null` for a field that has a default but no null (e.g. `top_p`) means that default."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """The official clients send `null` for an argument given as None, and OpenAI's API reads
        it as not given. A field whose type has a null keeps it (`max_tokens: null`: what fits)."""
        if not isinstance(data, dict):
            return data
        defaulted = _defaulted_without_null(cls)
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if isinstance(value, str | list | tuple | dict) and (error := _first_lone_surrogate(value)):
            raise error
        return value


@functools.cache
def _defaulted_without_null(model: type[BaseModel]) -> frozenset[str]:
    """The keys (aliases where set) of `model`'s optional fields whose type does not allow None."""
    return frozenset(
        field.alias or name
        for name, field in model.model_fields.items()
        if not field.is_required() and not _allows_none(field.annotation)
    )


def _allows_none(annotation: Any) -> bool:
    return annotation is Any or annotation is type(None) or type(None) in get_args(annotation)


def _clean_union_error(message: str):
    """A wrap validator that replaces pydantic's one-error-per-union-member list with one message
    (a lone surrogate keeps its own message)."""

    def validate(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:
            if error := _first_lone_surrogate(value):
                raise error from None
            raise ValueError(message) from None

    return classmethod(validate)


class StreamOptions(RequestModel):
    include_usage: StrictBool = False


class JsonSchemaFormat(RequestModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(RequestModel):
    """vLLM's `structured_outputs` extra: exactly one of these."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | None = Field(None, alias="json")
    json_object: StrictBool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingFields(RequestModel):
    """Fields both endpoints share: OpenAI's sampling fields plus vLLM's extra ones. Bounds here
    are the API's own policy (OpenAI's limits); whether a value can work at all is checked once,
    by `SamplingParams` and the engine's input processing (a 400 naming the field either way)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: StrictInt = Field(1, le=64)
    temperature: float | None = Field(None, le=2)
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as vLLM: room for seed + index
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling fields
    top_k: StrictInt = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None

    _stop = field_validator("stop", mode="wrap")(_clean_union_error("must be a string or a list of strings"))


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]
    max_tokens: StrictInt | None = Field(16, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: str | None = None

    _prompt = field_validator("prompt", mode="wrap")(
        _clean_union_error(
            "must be a string, a list of strings, a list of token ids or a list of token-id lists"
        )
    )

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if len(prompt) == 0 or any(not isinstance(p, int) and len(p) == 0 for p in prompt):
            raise ValueError("must not be empty")
        return prompt


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


class FunctionCall(RequestModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(RequestModel):
    id: str = Field(default_factory=lambda: random_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call

    _content = field_validator("content", mode="wrap")(
        _clean_union_error("must be a string or a list of {'type': 'text', 'text': ...} parts")
    )

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; None: no arguments
    strict: StrictBool | None = None


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    _tool_choice = field_validator("tool_choice", mode="wrap")(
        _clean_union_error(
            "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
        )
    )
    add_generation_prompt: StrictBool = True


# ---- responses ----


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One entry of vLLM's `prompt_logprobs`."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # vLLM's: per prompt token, by token id


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):  # OpenAI sends id, type and name only in a call's first delta
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):  # OpenAI sends `role` only in a choice's first chunk
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "kvpilot"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    import json

    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
