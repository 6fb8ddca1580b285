"""Prompt logprobs from the prefill's logits against transformers on the tiny checkpoint: chunked
prefill, prefix-cache hits recomputed only for requests that ask, n > 1, preemption."""

import random

import pytest
import torch
import transformers
from kvpilot.serving import LLM, SamplingParams

NUM_TOP = 3


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """prompt -> transformers' log-softmax rows for positions 0..len-2 (each predicts the next token)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (2, 13, 30)]
    rows = {}
    with torch.inference_mode():
        for prompt in prompts:
            rows[tuple(prompt)] = torch.log_softmax(
                model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1
            )
    return prompts, rows


def check(output, rows: torch.Tensor) -> None:
    prompt = output.prompt_token_ids
    entries = output.prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None
    for position, entry in enumerate(entries[1:]):
        row, token = rows[position], prompt[position + 1]
        top_values, top_ids = row.topk(NUM_TOP)
        assert set(entry) == {token, *top_ids.tolist()}
        assert entry[token] == pytest.approx(row[token].item(), abs=1e-4)
        for token_id, value in zip(top_ids.tolist(), top_values.tolist(), strict=True):
            assert entry[token_id] == pytest.approx(value, abs=1e-4)


def test_prompt_logprobs_match_transformers_in_chunks_and_despite_the_prefix_cache(tiny_llama, reference):
    prompts, rows = reference
    llm = LLM(model=str(tiny_llama), num_kv_blocks=64, block_size=4, max_num_batched_tokens=8)
    plain = llm.generate(prompts, SamplingParams(max_tokens=2))
    assert all(out.prompt_logprobs is None for out in plain)
    hits_before = llm.llm_engine.get_stats().prefix_cache_hits
    asked = llm.generate(prompts, SamplingParams(max_tokens=2, prompt_logprobs=NUM_TOP, n=2, temperature=0.0))
    for output in asked:
        check(output, rows[tuple(output.prompt_token_ids)])
    # The cached prompts were recomputed for their logits; the second of n = 2 hit the cache.
    hits = llm.llm_engine.get_stats().prefix_cache_hits - hits_before
    assert 0 < hits <= sum((len(p) - 1) // 4 * 4 for p in prompts)
    again = llm.generate(prompts, SamplingParams(max_tokens=2))
    assert llm.llm_engine.get_stats().prefix_cache_hits > hits_before + hits
    assert all(out.prompt_logprobs is None for out in again)


def test_prompt_logprobs_survive_preemption(tiny_llama, reference):
    prompts, rows = reference
    # chunks of 8: the 30-token prompt is preempted in the middle of its prefill, and recomputes
    llm = LLM(model=str(tiny_llama), num_kv_blocks=10, block_size=4, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=6, prompt_logprobs=NUM_TOP, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert llm.llm_engine.get_stats().num_preemptions > 0
    for output in outputs:
        check(output, rows[tuple(output.prompt_token_ids)])


PROMPT = list(range(300, 345))  # 45 tokens: three chunks of 16 at max_num_batched_tokens=16


@pytest.fixture(scope="module")
def reference_45(tiny_llama) -> torch.Tensor:
    """log-softmax of Hugging Face's logits: row p scores token p + 1."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0], dim=-1)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), num_kv_blocks=64, max_num_batched_tokens=16)


def check_45(prompt_logprobs, reference, num_top: int) -> None:
    assert len(prompt_logprobs) == len(PROMPT) and prompt_logprobs[0] is None
    for position, entry in enumerate(prompt_logprobs[1:]):
        token = PROMPT[position + 1]
        assert entry[token] == pytest.approx(reference[position, token].item(), abs=1e-4)
        top_values, top_ids = reference[position].topk(num_top)
        for token_id, value in zip(top_ids.tolist(), top_values.tolist(), strict=True):
            assert entry[token_id] == pytest.approx(value, abs=1e-4)
        assert len(entry) <= num_top + 1


def test_chunked_prefill_gives_every_prompt_logprob(llm, reference_45):
    output = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))[0]
    check_45(output.prompt_logprobs, reference_45, num_top=3)
    plain = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2))[0]
    assert plain.prompt_logprobs is None


def test_prefix_cache_hits_are_recomputed_only_when_asked(llm, reference_45):
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))  # the prompt's blocks are cached
    cached = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))[0]
    assert cached.num_cached_tokens == 32
    asked = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    assert asked.num_cached_tokens == 0
    check_45(asked.prompt_logprobs, reference_45, num_top=0)


def test_n_sequences_share_one_set_and_batch_with_others(llm, reference_45):
    params = SamplingParams(temperature=1.0, n=3, seed=0, max_tokens=3, prompt_logprobs=1)
    outputs = llm.generate([PROMPT, list(range(5, 30))], [params, SamplingParams(max_tokens=3)])
    check_45(outputs[0].prompt_logprobs, reference_45, num_top=1)
    assert len(outputs[0].outputs) == 3 and outputs[1].prompt_logprobs is None
