"""Model output as tool calls, per format: whole replies and the cumulative text of a stream."""

import json

import pytest
from kvpilot.serving.api.tool_parsers import ParsedCall, ToolCallParser
from kvpilot.serving.api.tools import ToolCallDeltas, tool_format

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

# (format, finished reply, expected content, expected calls as (name, arguments dict))
CASES = [
    ("hermes", "Just text.", "Just text.", []),
    ("hermes", f"<tool_call>\n{WEATHER}\n</tool_call>", "", [("get_weather", {"city": "Paris"})]),
    (
        "hermes",
        f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n"
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
        [("get_weather", {"city": "Paris"}), ("now", {})],
    ),
    ("hermes", f"<tool_call>\n{WEATHER}", "", [("get_weather", {"city": "Paris"})]),  # EOS before the end tag
    ("hermes", "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    (
        "hermes",
        f"<tool_call>{WEATHER}</tool_call><tool_call>{{broken</tool_call>",
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "llama3_json",
        '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}',
        "",
        [("a", {}), ("b", {"x": 1})],
    ),
    ("llama3_json", "The weather is fine.", "The weather is fine.", []),
    ("llama3_json", '{"no": "name"}', '{"no": "name"}', []),
    (
        "llama3_json",
        '{"name": "a", "parameters": {}} and more',
        '{"name": "a", "parameters": {}} and more',
        [],
    ),
    (
        "required",
        '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]',
        "",
        [("a", {"x": 1}), ("b", {})],
    ),
]


@pytest.mark.parametrize(("kind", "text", "content", "calls"), CASES)
def test_whole_replies(kind, text, content, calls):
    parsed = ToolCallParser(kind).parse(text, finished=True)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls


def test_named_choice_is_all_arguments():
    parsed = ToolCallParser("named", "get_weather").parse('{"city": "Oslo"}', finished=True)
    assert parsed.calls == [ParsedCall("get_weather", '{"city": "Oslo"}')]


@pytest.mark.parametrize(
    ("kind", "text"), [(kind, text) for kind, text, _, _ in CASES] + [("named", '{"a": [1, 2]}')]
)
def test_streaming_in_pieces_gives_the_same_result(kind, text):
    """Fed a character at a time, the deltas add up to what the whole reply parses to, and a
    tag's beginning is never sent as content."""
    parser = ToolCallParser(kind, "f")
    deltas = ToolCallDeltas(parser)
    content, calls = "", {}
    for end in range(1, len(text) + 1):
        piece, new_calls = deltas.delta(text[:end], finished=end == len(text))
        content += piece or ""
        assert "<tool" not in content or "<tool_call>\nnot json" in text
        for call in new_calls:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    whole = parser.parse(text, finished=True)
    assert content == whole.content
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.name, c.arguments) for c in whole.calls
    ]


LLAMA31_LIKE = '{% if tools %}Environment: ipython{% endif %}<|python_tag|>{"name": ..., "parameters": ...}'


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
        ("{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}<tool_call>", "hermes"),
        (LLAMA31_LIKE, "llama3_json"),
    ],
)
def test_tool_format_from_template(template, expected):
    assert tool_format(template) == expected
