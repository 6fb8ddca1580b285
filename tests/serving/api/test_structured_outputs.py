"""Structured outputs on the real server (tiny random checkpoint, sampling at temperature 1): every
output of a JSON Schema request validates with `jsonschema`, and the other kinds match too."""

import asyncio
import json
import random
import re
import threading

import httpx
import jsonschema
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Reply in JSON."}]


@pytest.fixture
async def async_client(api_server):
    async with openai.AsyncOpenAI(
        base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300
    ) as client:
        yield client


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["enum", "integer", "boolean", "string", "number", "const", "null", "pattern", "anyof"])
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", 1, 2, True, None], rng.randint(1, 4))}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 10}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "const":
        return {"const": rng.choice(["v1", 42, False])}
    if kind == "pattern":
        return {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{1,3}$"}
    if kind == "anyof":
        return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}
    return {"type": kind}


def _schema(rng: random.Random, depth: int = 0) -> dict:
    """A random object schema: enums, bounded numbers and strings, nested objects, arrays, required."""
    properties = {}
    for i in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.2 and depth < 2:
            value = _schema(rng, depth + 1)
        elif roll < 0.4:
            items = _schema(rng, depth + 1) if depth < 1 and rng.random() < 0.3 else _leaf(rng)
            value = {
                "type": "array",
                "items": items,
                "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3),
            }
        else:
            value = _leaf(rng)
        properties[f"field_{depth}_{i}"] = value
    names = list(properties)
    return {
        "type": "object",
        "properties": properties,
        "required": rng.sample(names, rng.randint(0, len(names))),
        "additionalProperties": False,
    }


SCHEMAS = [_schema(random.Random(seed)) for seed in range(46)] + [
    {  # $defs and $ref
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["x"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/point"},
            "b": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 2},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"enum": ["x", "y"]},
        "minItems": 2,
        "maxItems": 4,
    },  # not an object at the top
    {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date"}},
        "required": ["when"],
        "additionalProperties": False,
    },
    {"enum": ["only", "these", "three"]},
]


async def test_every_json_schema_output_validates(async_client):
    assert len(SCHEMAS) == 50

    async def one(index: int, schema: dict):
        response = await async_client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            temperature=1.0,
            max_tokens=400,
            seed=index,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema}},
        )
        return response.choices[0]

    choices = await asyncio.gather(*(one(i, s) for i, s in enumerate(SCHEMAS)))
    for schema, choice in zip(SCHEMAS, choices, strict=True):
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_on_completions_and_chat(client):
    completion = client.completions.create(
        model="tiny-llama",
        prompt="JSON:",
        max_tokens=60,
        temperature=1.0,
        seed=3,
        extra_body={"response_format": {"type": "json_object"}},  # vLLM's extra on completions
    )
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        max_tokens=60,
        temperature=1.0,
        seed=4,
        response_format={"type": "json_object"},
    )
    for choice, text in (
        (completion.choices[0], completion.choices[0].text),
        (chat.choices[0], chat.choices[0].message.content),
    ):
        if choice.finish_reason == "stop":  # an unbounded object may run out of tokens: then a prefix
            assert isinstance(json.loads(text), dict)
        else:
            assert choice.finish_reason == "length" and text.startswith("{")


def test_regex_choice_and_grammar(client):
    def complete(structured: dict, n: int = 4) -> list[str]:
        response = client.completions.create(
            model="tiny-llama",
            prompt="Answer:",
            max_tokens=40,
            temperature=1.0,
            n=n,
            seed=7,
            extra_body={"structured_outputs": structured},
        )
        assert {c.finish_reason for c in response.choices} == {"stop"}
        return [c.text for c in response.choices]

    assert all(re.fullmatch(r"[A-Z]{2}-\d{3}", text) for text in complete({"regex": r"[A-Z]{2}-\d{3}"}))
    assert set(complete({"choice": ["yes", "no", "maybe so"]}, n=8)) <= {"yes", "no", "maybe so"}
    gbnf = 'root ::= "(" expr ")"\nexpr ::= num | num "+" num\nnum ::= [1-9]'
    assert all(re.fullmatch(r"\([1-9](\+[1-9])?\)", text) for text in complete({"grammar": gbnf}))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert all(json.loads(text)["ok"] in (True, False) for text in complete({"json": schema}))


def test_choices_outside_the_bmp_come_back_exactly(client):
    """An emoji is one character in the grammar, not two UTF-16 halves that no text can match."""
    choices = ["😀", "go 🚀", "𝔘𝔫𝔦"]
    response = client.completions.create(
        model="tiny-llama",
        prompt="Answer:",
        max_tokens=40,
        temperature=1.0,
        n=6,
        seed=3,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert {c.finish_reason for c in response.choices} == {"stop"}
    assert {c.text for c in response.choices} <= set(choices)


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length(client):
    response = client.completions.create(
        model="tiny-llama",
        prompt="x",
        max_tokens=5,
        temperature=1.0,
        extra_body={"structured_outputs": {"regex": "a{200}"}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length" and re.fullmatch("a+", choice.text)
    assert response.usage.completion_tokens == 5


def test_streamed_structured_output_matches(client):
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        max_tokens=400,
        temperature=1.0,
        seed=11,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_compilation_is_cached_per_schema(api_server, client):
    schema = {"type": "object", "properties": {"cached": {"enum": [1, 2]}}, "required": ["cached"]}
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}
    client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=20, extra_body=body)
    manager = api_server.state.engine.engine.structured_output
    compiled = manager.num_compiled
    for _ in range(2):
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=20, extra_body=body)
    assert manager.num_compiled == compiled


def test_health_answers_while_a_grammar_compiles(api_server, client, monkeypatch):
    """A large schema can take seconds to compile: the event loop must not wait for it. The compile
    is held until /health has answered (or 30 s have passed, and the test fails)."""
    manager = api_server.state.engine.engine.structured_output
    compile_grammar = manager._compile
    started, release = threading.Event(), threading.Event()

    def held_compile(params):
        started.set()
        release.wait(30)
        return compile_grammar(params)

    monkeypatch.setattr(manager, "_compile", held_compile)
    request = threading.Thread(
        target=client.completions.create,
        kwargs=dict(
            model="tiny-llama",
            prompt="Code:",
            max_tokens=10,
            extra_body={"structured_outputs": {"regex": "held-[0-9]{3}"}},  # not in the cache
        ),
    )
    request.start()
    try:
        assert started.wait(30)
        assert httpx.get(f"{api_server.base_url}/health", timeout=5).json() == {"status": "ok"}
    finally:
        release.set()
        request.join(60)


def test_unsupported_schema_features_are_named(client):
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "uniqueItems": True},
            "n": {"type": "integer", "multipleOf": 3},
        },
    }
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "u", "schema": schema}},
        )
    error = raised.value.body
    assert error["param"] == "response_format.json_schema.schema"
    assert "uniqueItems (at $.properties.tags)" in error["message"]
    assert "multipleOf (at $.properties.n)" in error["message"]
