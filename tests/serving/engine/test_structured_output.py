"""Structured output in the engine: which schemas are refused (pure), the sampler's grammar masks on
the real tokenizer, and a batch where constrained and free requests run together."""

import json
import re

import pytest
import torch
import transformers
from kvpilot.serving import LLM, SamplingParams
from kvpilot.serving.engine.request import Request
from kvpilot.serving.engine.sampler import Sampler
from kvpilot.serving.engine.structured_output import StructuredOutputManager
from kvpilot.serving.structured_outputs import (
    MAX_SCHEMA_DEPTH,
    StructuredOutputsParams,
    check_json_schema,
    nesting_depth,
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


def test_schema_depth_is_limited_before_the_validator_recurses(manager):
    """Up to MAX_SCHEMA_DEPTH levels a schema is checked and compiles, even with a deep stack
    below (as under the server); one more is an InvalidParameter, never a RecursionError."""
    schema = {"type": "string"}
    while nesting_depth(schema) < MAX_SCHEMA_DEPTH:
        schema = {"type": "array", "items": schema}

    def with_frames_below(num_frames: int) -> None:
        if num_frames:
            return with_frames_below(num_frames - 1)
        check_json_schema(schema, "structured_outputs.json")
        manager.compile(StructuredOutputsParams(json=json.dumps(schema)))

    with_frames_below(300)
    with pytest.raises(InvalidParameter) as raised:
        check_json_schema({"type": "array", "items": schema}, "structured_outputs.json")
    assert raised.value.param == "structured_outputs.json"
    assert raised.value.message == (
        f"the JSON Schema nests {MAX_SCHEMA_DEPTH + 1} levels deep (objects and arrays); "
        f"at most {MAX_SCHEMA_DEPTH} are allowed"
    )


def test_nesting_depth_counts_objects_and_arrays():
    assert [nesting_depth(v) for v in ("a", {}, [], {"a": [1, {"b": None}]}, [[], [[{}]]])] == [0, 1, 1, 3, 4]


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


@pytest.mark.parametrize("choice", ["😀", "go 🚀!", 'a "quoted"\\path\n'])
def test_a_choice_is_matched_by_its_own_tokens_exactly(manager, tokenizer_dir, choice):
    """Beyond U+FFFF too: the grammar holds the character, not its two UTF-16 halves."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    state = manager.new_matcher(StructuredOutputsParams(choice=[choice, "other"]))
    assert all(state.accept(token) for token in tokenizer.encode(choice, add_special_tokens=False))
    assert state.accept(EOS) and state.is_terminated


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
    assert all(
        re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text) and c.finish_reason == "stop" for c in outputs[1].outputs
    )


def test_requests_with_a_grammar_get_no_drafts(tiny_llama):
    """With speculative decoding on, a constrained request is never drafted for (its matcher
    advances one sampled token at a time) and decodes as without drafts, also in a batch where a
    free request is being verified; the free request's repetitive text does get drafts."""
    regex = r"(ab){3,12}"
    constrained = SamplingParams(
        temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputsParams(regex=regex)
    )
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logit_bias={101: 30.0, 202: 30.0})
    prompt = "ab ab ab ab ab ab ab ab"
    plain = LLM(str(tiny_llama), num_kv_blocks=128)
    expected = plain.generate([prompt], constrained)[0].outputs[0]
    spec = LLM(str(tiny_llama), num_kv_blocks=128, speculative_ngram=1, num_speculative_tokens=4)
    alone = spec.generate([prompt], constrained)[0].outputs[0]
    assert spec.llm_engine.get_stats().spec_decode_num_draft_tokens == 0
    mixed = spec.generate([prompt, prompt], [constrained, free])
    assert spec.llm_engine.get_stats().spec_decode_num_draft_tokens > 0
    for output in (alone, mixed[0].outputs[0]):
        assert output.token_ids == expected.token_ids and output.finish_reason == expected.finish_reason
        assert re.fullmatch(regex, output.text)


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
