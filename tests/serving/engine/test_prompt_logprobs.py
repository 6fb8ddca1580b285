"""Prompt logprobs from the prefill's logits: equal to Hugging Face's log-softmax at every prompt
position, whatever the chunking, and recomputed (not served from the prefix cache) when asked."""

import pytest
import torch
import transformers
from kvpilot.serving import LLM, SamplingParams

PROMPT = list(range(300, 345))  # 45 tokens: three chunks of 16 at max_num_batched_tokens=16


@pytest.fixture(scope="module")
def reference(tiny_llama) -> torch.Tensor:
    """log-softmax of Hugging Face's logits: row p scores token p + 1."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0], dim=-1)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), num_kv_blocks=64, max_num_batched_tokens=16)


def check(prompt_logprobs, reference, num_top: int) -> None:
    assert len(prompt_logprobs) == len(PROMPT) and prompt_logprobs[0] is None
    for position, entry in enumerate(prompt_logprobs[1:]):
        token = PROMPT[position + 1]
        assert entry[token] == pytest.approx(reference[position, token].item(), abs=1e-4)
        top_values, top_ids = reference[position].topk(num_top)
        for token_id, value in zip(top_ids.tolist(), top_values.tolist(), strict=True):
            assert entry[token_id] == pytest.approx(value, abs=1e-4)
        assert len(entry) <= num_top + 1


def test_chunked_prefill_gives_every_prompt_logprob(llm, reference):
    output = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))[0]
    check(output.prompt_logprobs, reference, num_top=3)
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2))[0]
    assert plain.prompt_logprobs is None


def test_prefix_cache_hits_are_recomputed_only_when_asked(llm, reference):
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))  # the prompt's blocks are cached
    cached = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))[0]
    assert cached.num_cached_tokens == 32
    asked = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    assert asked.num_cached_tokens == 0
    check(asked.prompt_logprobs, reference, num_top=0)


def test_n_sequences_share_one_set_and_batch_with_others(llm, reference):
    params = SamplingParams(temperature=1.0, n=3, seed=0, max_tokens=3, prompt_logprobs=1)
    outputs = llm.generate([PROMPT, list(range(5, 30))], [params, SamplingParams(max_tokens=3)])
    check(outputs[0].prompt_logprobs, reference, num_top=1)
    assert len(outputs[0].outputs) == 3 and outputs[1].prompt_logprobs is None
