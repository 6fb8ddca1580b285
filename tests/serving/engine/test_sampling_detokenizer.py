"""Incremental detokenization with the real tokenizer: multi-byte characters, stop strings."""

import itertools

import pytest
import transformers
from kvpilot.serving.engine.detokenizer import IncrementalDetokenizer
from kvpilot.serving.sampling_params import SamplingParams
from kvpilot.serving.validation import InvalidParameter

TEXT = "Ünïcödé: 日本語のテキスト 🙂👍🏽 done. The end is near, the END."


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def feed(tokenizer, token_ids, params, prompt=(28, 957)):
    """Feed tokens one by one; returns (detokenizer, streamed texts, stop string or None)."""
    detokenizer = IncrementalDetokenizer(tokenizer, list(prompt), params)
    streamed = []
    for token_id in token_ids:
        stop = detokenizer.append(token_id)
        streamed.append(detokenizer.output_text(finished=stop is not None))
        if stop is not None:
            return detokenizer, streamed, stop
    return detokenizer, streamed, None


def test_never_splits_a_multibyte_character(tokenizer):
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # The case is real: some tokens hold only part of a character's bytes.
    assert any("\ufffd" in tokenizer.decode([t]) for t in token_ids)
    detokenizer, streamed, _ = feed(tokenizer, token_ids, SamplingParams())
    assert detokenizer.text == tokenizer.decode(token_ids) == TEXT
    for before, after in itertools.pairwise(streamed):
        assert "\ufffd" not in after and after.startswith(before)


@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [
        (("end",), False, "Ünïcödé: 日本語のテキスト 🙂👍🏽 done. The "),
        (("end",), True, "Ünïcödé: 日本語のテキスト 🙂👍🏽 done. The end"),
        (("near", "テキ"), False, "Ünïcödé: 日本語の"),  # the earliest match wins
        (("e e",), False, "Ünïcödé: 日本語のテキスト 🙂👍🏽 done. Th"),  # spans two tokens
        (("END.",), True, "Ünïcödé: 日本語のテキスト 🙂👍🏽 done. The end is near, the END."),
    ],
)
def test_stop_strings_cut_the_text_exactly(tokenizer, stop, include, expected):
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    detokenizer, streamed, matched = feed(tokenizer, token_ids, params)
    assert matched in stop
    assert detokenizer.output_text(finished=True) == expected
    # Streamed cumulative text only grows: a partial stop string is held back, never retracted.
    for before, after in itertools.pairwise(streamed):
        assert after.startswith(before)


@pytest.mark.parametrize(
    ("stop", "min_tokens", "expected", "num_tokens"),
    [
        (",", 0, " 6", 3),
        (",", 2, " 6", 3),
        (",", 3, " 6, 7", 6),  # the first 3 tokens (" ", "6", ",") cannot stop it, as EOS cannot
        (",", 6, " 6, 7, 8", 9),
        (", 7", 4, " 6", 5),  # completed by token 5: it counts, though it began earlier
    ],
)
def test_stop_strings_wait_for_min_tokens(tokenizer, stop, min_tokens, expected, num_tokens):
    token_ids = tokenizer.encode(" 6, 7, 8, 9, 10,", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(token_ids[:3]) == ["Ġ", "6", ","]  # one token a character
    params = SamplingParams(stop=(stop,), min_tokens=min_tokens)
    detokenizer, streamed, matched = feed(tokenizer, token_ids, params)
    assert (matched, detokenizer.output_text(finished=True), len(streamed)) == (stop, expected, num_tokens)


@pytest.mark.parametrize("stop", ["", ("end", "")])
def test_an_empty_stop_string_is_refused(stop):
    """ "" is found at every position: it would end every request after its first character."""
    with pytest.raises(InvalidParameter) as raised:
        SamplingParams(stop=stop)
    assert (raised.value.param, raised.value.message) == ("stop", "stop strings must not be empty")


def test_skip_special_tokens(tokenizer):
    token_ids = [*tokenizer.encode("Hello", add_special_tokens=False), tokenizer.eos_token_id]
    assert feed(tokenizer, token_ids, SamplingParams())[0].text == "Hello"
    kept = feed(tokenizer, token_ids, SamplingParams(skip_special_tokens=False))[0].text
    assert kept == "Hello" + tokenizer.eos_token


def test_without_a_tokenizer_text_stays_empty():
    detokenizer = IncrementalDetokenizer(None, [1, 2], SamplingParams(stop=("x",)))
    assert detokenizer.append(5) is None and detokenizer.output_text(True) == ""
