"""Prompt logprobs against transformers on the tiny checkpoint: chunked prefill, prefix-cache
hits recomputed only for requests that ask, n > 1, preemption."""

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
