"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF): loads, answers sensibly, and matches
transformers loading the same GGUF token for token."""

import pytest
import torch
import transformers
from kvpilot.serving import LLM, SamplingParams

NUM_NEW_TOKENS = 16
PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="session")
def default_llm(default_gguf) -> LLM:
    return LLM(model=str(default_gguf), num_kv_blocks=64)


@pytest.fixture(scope="session")
def hf_default_model(default_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()


def chat_prompt_ids(llm: LLM, question: str) -> list[int]:
    tokenizer = llm.get_tokenizer()
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_default_model_loads_with_its_tokenizer_and_template(default_llm):
    engine = default_llm.llm_engine
    assert engine.max_model_len == 8192 and engine.vocab_size == 49152
    assert engine.eos_token_ids == {2}
    assert "<|im_start|>" in engine.chat_template
    config = engine.model_runner.model_config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.tie_word_embeddings


def test_the_tokenizer_is_the_one_auto_tokenizer_builds(default_llm, default_gguf):
    """The loader skips AutoTokenizer's config detour (start-up time), not its result."""
    ours = default_llm.get_tokenizer()
    auto = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    assert type(ours) is type(auto)
    assert ours.special_tokens_map == auto.special_tokens_map and ours.get_vocab() == auto.get_vocab()
    text = "  Hello, world!\n\tcafé — 日本語 🙂 <|im_start|>user\nhi<|im_end|> 12345 don't"
    for add_special_tokens in (True, False):
        assert ours.encode(text, add_special_tokens=add_special_tokens) == auto.encode(
            text, add_special_tokens=add_special_tokens
        )
    ids = auto.encode(text)
    assert ours.decode(ids) == auto.decode(ids)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def test_answers_the_capital_of_france(default_llm):
    prompt = chat_prompt_ids(default_llm, "What is the capital of France?")
    output = default_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert "Paris" in output.outputs[0].text


def test_greedy_tokens_match_transformers_on_the_same_gguf(default_llm, hf_default_model):
    tokenizer = default_llm.get_tokenizer()
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    ours = [list(out.outputs[0].token_ids) for out in default_llm.generate(prompts, params)]
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, ours, strict=True):
            reference = hf_default_model.generate(
                torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=2
            )[0, len(prompt) :].tolist()
            # transformers stops at EOS; kvpilot (ignore_eos) continues, so compare up to there
            assert tokens[: len(reference)] == reference
            assert len(reference) >= 4
