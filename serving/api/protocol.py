"""OpenAI request and response bodies (with vLLM's extra sampling fields), validated at the edge."""

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_serializer,
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
    naming the field, rather than a tokenizer's TypeError or a response that cannot be encoded)."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if isinstance(value, str | list | tuple | dict) and (error := _first_lone_surrogate(value)):
            raise error
        return value


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
    seed: StrictInt | None = None
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
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True

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


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    _content = field_validator("content", mode="wrap")(
        _clean_union_error("must be a string or a list of {'type': 'text', 'text': ...} parts")
    )

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(RequestModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None  # accepted only empty: no function calling yet
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


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None

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
