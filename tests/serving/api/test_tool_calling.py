"""Tool calling with the official `openai` client on the real server (tiny random checkpoint with the
real tokenizer; its template has no tools support, so tools reach it in the Hermes system prompt),
and the rendering of tools and tool messages through a template that has it."""

import json

import jsonschema
import openai
import pytest
from kvpilot.serving.api.prompts import ModelInfo, chat_prompt
from kvpilot.serving.api.protocol import ChatCompletionRequest
from kvpilot.serving.api.tools import plan_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
TOOLS = [WEATHER, CLOCK]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {
    "get_weather": WEATHER["function"]["parameters"],
    "get_time": {"type": "object", "maxProperties": 0},
}


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_choice_always_gives_parsable_calls(client):
    response = client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        n=4,
        seed=1,
        max_tokens=300,
    )
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.tool_calls and choice.message.content is None
        for call in choice.message.tool_calls:
            _check_call(call)


def test_named_choice_calls_that_function(client):
    response = client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        tools=TOOLS,
        temperature=1.0,
        n=3,
        seed=2,
        max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        _check_call(call)


def test_auto_and_none_give_text_from_a_model_that_does_not_call(client):
    """The random model writes no <tool_call>: auto parses nothing out, none never parses."""
    for choice in ("auto", "none"):
        response = client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=8,
            temperature=0,
        )
        message = response.choices[0].message
        assert message.content and not message.tool_calls
        assert response.choices[0].finish_reason == "length"


def test_prompt_carries_the_tools(client):
    """Without template support, the tools are in the system prompt (more prompt tokens)."""
    plain = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=1)
    with_tools = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, tools=TOOLS, max_tokens=1
    )
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_streamed_tool_call_deltas_add_up_to_the_call(client, tool_choice):
    kwargs = dict(model="tiny-llama", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice)
    kwargs |= dict(temperature=1.0, seed=5, max_tokens=300)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls
    ]
    assert all(c["id"] for c in calls.values())
    if tool_choice == "named":  # the arguments arrive in pieces, as generated
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls) > 2


def test_multi_turn_with_tool_messages(client):
    first = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=300, seed=3
    )
    assistant = first.choices[0].message
    messages = [*MESSAGES, assistant.model_dump(exclude_none=True)]
    for call in assistant.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})})
    second = client.chat.completions.create(model="tiny-llama", messages=messages, tools=TOOLS, max_tokens=5)
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_with_tools_support_renders_tools_calls_and_results(api_server):
    model = ModelInfo(
        api_server.state.engine.tokenizer, HERMES_TEMPLATE, max_model_len=2048, vocab_size=49152
    )
    request = ChatCompletionRequest(
        messages=[
            *MESSAGES,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        ],
        tools=TOOLS,
    )
    text = chat_prompt(request, model, plan_tools(request, HERMES_TEMPLATE)).text
    assert '{"type": "function", "function": {"name": "get_weather"' in text  # the template's own tools block
    assert "# Tools\n\nYou may call" not in text  # not the fallback prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text


def test_a_developer_message_is_the_system_message_for_a_template_that_does_not_know_it(api_server):
    """OpenAI's newer name for the system message. SmolLM2's template knows only `system`: it
    wrote a `developer` turn and still added its own default system prompt before it."""
    engine_model = ModelInfo(
        api_server.state.engine.tokenizer, HERMES_TEMPLATE, max_model_len=2048, vocab_size=49152
    )
    request = ChatCompletionRequest(messages=[{"role": "developer", "content": "Be terse."}, *MESSAGES])
    text = chat_prompt(request, engine_model).text
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>") and "developer" not in text
    knows_it = ModelInfo(
        api_server.state.engine.tokenizer,
        HERMES_TEMPLATE.replace(
            "{% else %}",
            "{% elif message.role == 'developer' %}<|im_start|>developer\n"
            "{{ message.content }}<|im_end|>\n{% else %}",
            1,
        ),
        max_model_len=2048,
        vocab_size=49152,
    )
    assert chat_prompt(request, knows_it).text.startswith("<|im_start|>developer\nBe terse.")
