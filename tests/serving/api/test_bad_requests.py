"""Malformed requests get OpenAI's error body with the documented 4xx status, and the server keeps serving."""

import json

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def nested_schema(depth: int) -> dict:
    """Arrays of arrays `depth` levels deep: a valid schema that once overflowed the validator's stack."""
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


# (endpoint, body (dict, or raw str), status, param named in the error, code)
CASES = [
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": 3', 400, None, None),  # invalid JSON
    (COMPLETIONS, "[1, 2, 3]", 400, None, None),  # not an object
    (COMPLETIONS, {}, 400, "prompt", None),  # missing prompt
    (COMPLETIONS, {"prompt": 42}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [1, "a"]}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [10**9]}, 400, "prompt", None),  # token id outside the vocabulary
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n", None),
    (COMPLETIONS, {"prompt": "hi", "n": True}, 400, "n", None),
    (COMPLETIONS, {"prompt": "hi", "stop": 5}, 400, "stop", None),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 50}, 400, "logprobs", None),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"99999999999999999999": 1}}, 400, "logit_bias", None),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias.5", None),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"²": 1}}, 400, "logit_bias", None),  # a digit int() refuses
    (COMPLETIONS, {"prompt": "hi", "seed": 2**64}, 400, "seed", None),  # beyond what torch can seed
    (COMPLETIONS, {"prompt": "hi", "seed": -(2**63) - 1}, 400, "seed", None),
    (COMPLETIONS, {"prompt": "hi", "stop": ""}, 400, "stop", None),  # would match at once
    (CHAT, {"messages": MESSAGES, "stop": ["end", ""]}, 400, "stop", None),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty", None),
    # Checked once, by the engine's input processing (SamplingParams), not the HTTP schema:
    (COMPLETIONS, {"prompt": "hi", "top_k": -2}, 400, "top_k", None),
    (COMPLETIONS, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", None),
    (COMPLETIONS, {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "min_tokens": 8, "max_tokens": 4}, 400, "min_tokens", None),  # vLLM too
    (COMPLETIONS, {"prompt": "hi", "min_p": 1.5}, 400, "min_p", None),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids", None),
    (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    (COMPLETIONS, {"prompt": "hi " * 3000}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {"messages": "hi"}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", None),
    (CHAT, {"messages": [{"role": "user", "content": 7}]}, 400, "messages.0.content", None),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages.0.role", None),
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    # Structured outputs: malformed or unsupported schemas, bad specs (the field is named)
    (CHAT, {"messages": MESSAGES, "response_format": {"type": "xml"}}, 400, "response_format.type", None),
    (
        CHAT,
        {"messages": MESSAGES, "response_format": {"type": "json_schema"}},
        400,
        "response_format.json_schema",
        None,
    ),
    (
        CHAT,
        {
            "messages": MESSAGES,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}},
        },
        400,
        "response_format.json_schema.schema",
        None,
    ),
    (
        COMPLETIONS,
        {
            "prompt": "hi",
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"required": "a"}}},
        },
        400,
        "response_format.json_schema.schema",
        None,
    ),
    (  # a schema the grammar compiler rejects: the message is the compiler's, the field the request's
        COMPLETIONS,
        {
            "prompt": "hi",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}},
            },
        },
        400,
        "response_format.json_schema.schema",
        None,
    ),
    (
        COMPLETIONS,
        {"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}},
        400,
        "structured_outputs",
        None,
    ),
    (
        COMPLETIONS,
        {"prompt": "hi", "structured_outputs": {"choice": []}},
        400,
        "structured_outputs.choice",
        None,
    ),
    (
        COMPLETIONS,
        {"prompt": "hi", "structured_outputs": {"regex": "(unclosed"}},
        400,
        "structured_outputs.regex",
        None,
    ),
    (
        COMPLETIONS,
        {"prompt": "hi", "structured_outputs": {"grammar": "root ::= undefined_rule"}},
        400,
        "structured_outputs.grammar",
        None,
    ),
    (COMPLETIONS, {"prompt": "hi", "structured_outputs": {"jsn": {}}}, 400, "structured_outputs.jsn", None),
    (
        CHAT,
        {
            "messages": MESSAGES,
            "response_format": {"type": "json_schema", "json_schema": {"schema": nested_schema(150)}},
        },
        400,
        "response_format.json_schema.schema",
        None,
    ),
    (
        COMPLETIONS,
        {"prompt": "hi", "structured_outputs": {"json": nested_schema(150)}},
        400,
        "structured_outputs.json",
        None,
    ),
    # Tools: malformed definitions and choices
    (
        CHAT,
        {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f g"}}]},
        400,
        "tools.0.function.name",
        None,
    ),
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "retrieval"}]}, 400, "tools.0.type", None),
    (
        CHAT,
        {
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": nested_schema(150)}}],
        },
        400,
        "tools[0].function.parameters",
        None,
    ),
    (
        CHAT,
        {
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
        },
        400,
        "tools[0].function.parameters",
        None,
    ),
    (
        CHAT,
        {
            "messages": MESSAGES,
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"not": {"type": "string"}}}}
            ],
            "tool_choice": "required",
        },
        400,
        "tools[0].function.parameters",
        None,
    ),
    (
        CHAT,
        {
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        400,
        "tool_choice",
        None,
    ),
    (CHAT, {"messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice", None),
    (
        CHAT,
        {
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
            "structured_outputs": {"regex": "a+"},
        },
        400,
        "tool_choice",
        None,
    ),
    (CHAT, {"messages": MESSAGES, "tool_choice": "sometimes"}, 400, "tool_choice", None),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", None),
    (CHAT, {"messages": MESSAGES, "logprobs": "yes"}, 400, "logprobs", None),
    (CHAT, {"messages": MESSAGES, "stop_token_ids": [10**7]}, 400, "stop_token_ids", None),
    (CHAT, {"messages": MESSAGES, "model": "nope"}, 404, "model", "model_not_found"),
]


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.base_url, timeout=30) as client:
        yield client


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), CASES)
def test_malformed_body_gets_openai_error(http, path, body, status, param, code):
    if isinstance(body, str):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json={"model": "tiny-llama"} | body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == ("invalid_request_error" if status in (400, 404) else error["type"])
    assert error["param"] == param
    assert error["code"] == code
    if param is not None:
        assert param.split(".")[0] in error["message"]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_content_type(http, content_type):
    """`curl -d '{...}'` sends a form content type; OpenAI's API reads the body as JSON anyway."""
    body = json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 2})
    headers = {"content-type": content_type} if content_type else {}
    response = http.post(COMPLETIONS, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1
    response = http.post(COMPLETIONS, content='{"prompt": "hi"', headers=headers)
    assert response.status_code == 400 and "invalid JSON body" in response.json()["error"]["message"]


def test_a_browser_must_send_json_as_application_json(http):
    """A page on another site can POST `text/plain` without a CORS preflight: a request with
    `Origin` is read as JSON only under a JSON content type, and is told which to send."""
    body = json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 2})
    origin = {"origin": "https://elsewhere.example"}
    response = http.post(COMPLETIONS, content=body, headers=origin | {"content-type": "text/plain"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "the content-type must be application/json (got text/plain)"
    json_type = {"content-type": "application/json; charset=utf-8"}
    assert http.post(COMPLETIONS, content=body, headers=origin | json_type).status_code == 200


def test_unknown_route_and_method_are_openai_errors(http):
    assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    response = http.get("/v1/completions")
    assert response.status_code == 405 and response.json()["error"]["message"]


def test_server_still_serves_after_bad_input(http):
    for path, body, *_ in CASES:  # all of them again, back to back
        if isinstance(body, str):
            response = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = http.post(path, json=body)
        assert 400 <= response.status_code < 500
    response = http.post(COMPLETIONS, json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1


def test_chat_without_a_template_is_a_clear_400(api_server):
    from kvpilot.serving.api.errors import APIError
    from kvpilot.serving.api.prompts import ModelInfo, chat_prompt
    from kvpilot.serving.api.protocol import ChatCompletionRequest

    no_template = ModelInfo(api_server.state.engine.tokenizer, None, max_model_len=2048, vocab_size=49152)
    with pytest.raises(APIError) as raised:
        chat_prompt(ChatCompletionRequest(messages=MESSAGES), no_template)
    assert raised.value.status_code == 400 and "chat template" in raised.value.message
