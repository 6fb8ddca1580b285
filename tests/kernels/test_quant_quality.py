"""Quality of every quantization mode on the default model, measured on the shipped English text.

Perplexity over the first 1,024 tokens of serving/data/essays.txt, prefilled through the paged
KV cache, for each weight format and KV-cache dtype, against the float baseline (the GGUF's
Q4_1/Q8_0 blocks dequantized to float32); and greedy chat answers in int8 vs float.
"""

import pytest
import transformers
from kvpilot.serving.bench.quant import Checkpoint, evaluation_tokens, greedy_continuations, perplexity

NUM_TOKENS = 1024
QUESTIONS = [
    "What is the capital of France?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What is two plus two?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "What is the largest planet in our solar system?",
    "Translate 'hello' into Spanish.",
    "What do bees make?",
]


@pytest.fixture(scope="module")
def checkpoint(default_gguf) -> Checkpoint:
    return Checkpoint(default_gguf)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def models(checkpoint):
    """Each weight format built once for the module."""
    built = {}

    def get(quantization: str, group_size: int | None = None):
        key = (quantization, group_size)
        if key not in built:
            built[key] = checkpoint.model(quantization, group_size)
        return built[key]

    return get


@pytest.fixture(scope="module")
def tokens(tokenizer) -> list[int]:
    return evaluation_tokens(tokenizer, NUM_TOKENS)


@pytest.fixture(scope="module")
def baseline(models, tokens) -> float:
    return perplexity(models("none"), tokens)


def test_float_baseline_is_a_sensible_perplexity(baseline):
    assert 10 < baseline < 60  # a 135M model on plain English prose


@pytest.mark.parametrize(
    ("quantization", "group_size", "kv_cache_dtype", "max_increase"),
    [
        ("int8", None, "auto", 0.02),
        ("w8a8", None, "auto", 0.02),
        ("w8a8", None, "int8", 0.02),  # `kvpilot bench throughput`'s best mode
        ("int4", 32, "auto", 0.05),
        ("fp8", None, "auto", 0.05),
        ("none", None, "int8", 0.02),
        ("none", None, "fp8", 0.02),
    ],
)
def test_perplexity_stays_within_bounds(
    models, tokens, baseline, quantization, group_size, kv_cache_dtype, max_increase
):
    value = perplexity(models(quantization, group_size), tokens, kv_cache_dtype)
    assert value <= baseline * (1 + max_increase), f"{value:.3f} vs float {baseline:.3f}"


def test_int4_weights_take_a_quarter_of_float32_memory(models):
    assert models("none").weight_bytes / models("int4", 32).weight_bytes > 4
    assert models("none").weight_bytes / models("int8").weight_bytes > 3.5


def test_int8_greedy_answers_match_float(models, tokenizer):
    chats = [[{"role": "user", "content": question}] for question in QUESTIONS]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    expected = greedy_continuations(models("none"), prompts, max_tokens=8)
    got = greedy_continuations(models("int8"), prompts, max_tokens=8)
    assert "Paris" in tokenizer.decode(expected[0])  # the float answers are real answers
    assert got == expected
