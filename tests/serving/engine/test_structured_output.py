"""Structured output in the engine: which schemas are refused (pure), the sampler's grammar masks on
the real tokenizer, and a batch where constrained and free requests run together."""

import json

import pytest
import torch
import transformers
from kvpilot.serving import LLM, SamplingParams
from kvpilot.serving.engine.request import Request
from kvpilot.serving.engine.sampler import Sampler
from kvpilot.serving.engine.structured_output import StructuredOutputManager
from kvpilot.serving.structured_outputs import (
    StructuredOutputsParams,
    check_json_schema,
    unsupported_features,
)
from kvpilot.serving.validation import InvalidParameter

EOS = 2


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"]}, []),
        ({"$defs": {"p": {"enum": [1]}}, "anyOf": [{"$ref": "#/$defs/p"}, {"type": "null"}]}, []),
        ({"type": "array", "uniqueItems": True}, ["uniqueItems (at $)"]),
        ({"properties": {"a": {"items": {"not": {}}}}}, ["not (at $.properties.a.items)"]),
        ({"oneOf": [{"type": "string"}], "allOf": [{}]}, ["oneOf (at $)", "allOf (at $)"]),
        ({"$defs": {"x": {"patternProperties": {}}}}, ["patternProperties (at $.$defs.x)"]),
        (
            {"$ref": "https://example.com/schema.json"},
            ["$ref to another document 'https://example.com/schema.json' (at $)"],
        ),
        (
            {"type": "string", "format": "color"},
            [
                "format 'color' (at $; supported: "
                "date, date-time, email, hostname, ipv4, ipv6, time, uri, uuid)"
            ],
        ),
        (
            {"properties": {"format": {"type": "string"}, "not": {"type": "integer"}}},
            [],
        ),  # property names, not keywords
    ],
)
def test_unsupported_features_are_found_and_named(schema, expected):
    assert unsupported_features(schema) == expected


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ([1, 2], "must be an object"),
        ({"type": "strin"}, "malformed JSON Schema at type"),
        ({"properties": {"a": {"minLength": -1}}}, "malformed JSON Schema at properties/a/minLength"),
        ({"type": "array", "contains": {}}, "unsupported JSON Schema features: contains (at $)"),
    ],
)
def test_check_json_schema_errors_name_the_param(schema, message):
    with pytest.raises(InvalidParameter) as raised:
        check_json_schema(schema, "response_format.json_schema.schema")
    assert raised.value.param == "response_format.json_schema.schema"
    assert message in raised.value.message


def test_exactly_one_kind_of_constraint():
    assert StructuredOutputsParams(regex="a+").kind == "regex"
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    for bad in (dict(), dict(regex="a", grammar="root ::= 'a'"), dict(choice=[]), dict(choice=[1])):
        with pytest.raises(InvalidParameter):
            StructuredOutputsParams(**bad)


@pytest.fixture(scope="module")
def manager(tokenizer_dir) -> StructuredOutputManager:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    return StructuredOutputManager(tokenizer, 49152, {EOS})


def test_the_mask_leaves_only_what_the_grammar_allows(manager, tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    params = SamplingParams(temperature=1.0, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    constrained = Request(
        "c", [1], params, max_tokens=10, grammar=manager.new_matcher(params.structured_outputs)
    )
    free = Request("f", [1], SamplingParams(temperature=1.0), max_tokens=10)
    sampler = Sampler({EOS}, torch.Generator().manual_seed(0))
    logits = torch.randn(2, 49152)
    processed = sampler.process_logits(logits, [free, constrained])
    assert torch.equal(processed[0], logits[0])  # the free row is untouched
    allowed = torch.isfinite(processed[1]).nonzero().flatten().tolist()
    assert allowed and all(
        "yes".startswith(t) or "no".startswith(t) for t in tokenizer.batch_decode([[i] for i in allowed])
    )
    text = []
    for _ in range(5):  # sampling follows the grammar to its end: then only EOS is left
        token = sampler(logits, [free, constrained]).token_ids[1]
        if token == EOS:
            break
        text.append(token)
        assert constrained.grammar.accept(token)
        constrained.output_token_ids.append(token)
    assert tokenizer.decode(text) in ("yes", "no")


def test_compiled_once_per_spec(manager):
    schema = StructuredOutputsParams(
        json=json.dumps({"type": "object", "properties": {"q": {"type": "integer"}}})
    )
    before = manager.num_compiled
    first = manager.compile(schema)
    assert manager.compile(StructuredOutputsParams(json=schema.json)) is first
    assert manager.num_compiled == before + 1


def test_constrained_and_free_requests_share_a_batch(tiny_llama):
    """Greedy free requests give the same tokens beside constrained ones as alone, and every
    constrained sequence (n=3, sampled) matches its regex."""
    llm = LLM(str(tiny_llama), num_kv_blocks=128)
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["The capital of France is", "Once upon a time"], free)
    regex = SamplingParams(
        temperature=1.0,
        n=3,
        seed=0,
        max_tokens=20,
        structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"),
    )
    outputs = llm.generate(["The capital of France is", "Pick:", "Once upon a time"], [free, regex, free])
    assert [o.outputs[0].token_ids for o in (outputs[0], outputs[2])] == [
        o.outputs[0].token_ids for o in alone
    ]
    import re

    assert all(
        re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text) and c.finish_reason == "stop" for c in outputs[1].outputs
    )


def test_a_spec_the_compiler_rejects_names_the_request_field(manager):
    schema = {"type": "string", "minLength": 10, "maxLength": 2}
    with pytest.raises(InvalidParameter) as raised:
        manager.compile(
            StructuredOutputsParams(json=json.dumps(schema), param="response_format.json_schema.schema")
        )
    assert raised.value.param == "response_format.json_schema.schema"
    assert raised.value.message == "cannot be compiled: minLength 10 is greater than maxLength 2"
    with pytest.raises(InvalidParameter) as raised:
        manager.compile(StructuredOutputsParams(regex="(?<=a)b"))
    assert raised.value.param == "structured_outputs.regex" and "Lookbehind" in raised.value.message
