"""Greedy parity with transformers: kvpilot's continuations are token-identical to
`generate(do_sample=False)` in float32, whatever the batching, chunking, caching or preemption."""

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from kvpilot.serving import LLM, SamplingParams

from tests.checkpoints import ARCHITECTURES

NUM_NEW_TOKENS = 10
PROMPT_LENGTHS = (1, 2, 5, 9, 16, 23, 40, 71)
SHARED_PREFIX_LENGTH = 37
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


@dataclass
class Case:
    checkpoint: Path
    prompts: list[list[int]]  # different lengths
    shared_prefix_prompts: list[list[int]]  # one long prefix, different suffixes
    expected: dict[tuple[int, ...], list[int]]  # prompt -> transformers' greedy continuation


@pytest.fixture(scope="session", params=sorted(ARCHITECTURES))
def case(request, tiny_checkpoints) -> Case:
    """transformers is loaded once per architecture and gives the reference continuations."""
    checkpoint = tiny_checkpoints[request.param]
    rng = random.Random(request.param)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in PROMPT_LENGTHS]
    prefix = [rng.randrange(3, 49152) for _ in range(SHARED_PREFIX_LENGTH)]
    shared = [prefix + [rng.randrange(3, 49152) for _ in range(n)] for n in (0, 1, 4, 11, 20)]
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = {}
    with torch.inference_mode():
        for prompt in prompts + shared:
            output = model.generate(
                torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=0
            )
            continuation = output[0, len(prompt) :].tolist()
            assert len(continuation) == NUM_NEW_TOKENS, "reference stopped at EOS; pick other prompts"
            expected[tuple(prompt)] = continuation
    return Case(checkpoint, prompts, shared, expected)


def continuations(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate(prompts, GREEDY)
    assert [out.prompt_token_ids for out in outputs] == prompts
    assert all(out.outputs[0].finish_reason == "length" for out in outputs)
    return [list(out.outputs[0].token_ids) for out in outputs]


def expected_for(case: Case, prompts: list[list[int]]) -> list[list[int]]:
    return [case.expected[tuple(prompt)] for prompt in prompts]


def test_one_by_one_and_all_at_once(case):
    llm = LLM(model=str(case.checkpoint), num_kv_blocks=256, enable_prefix_caching=False)
    assert [continuations(llm, [prompt])[0] for prompt in case.prompts] == expected_for(case, case.prompts)
    assert continuations(llm, case.prompts) == expected_for(case, case.prompts)
    assert llm.llm_engine.get_stats().num_preemptions == 0


def test_prefix_caching_with_a_shared_long_prefix(case):
    llm = LLM(model=str(case.checkpoint), num_kv_blocks=256, block_size=8, enable_prefix_caching=True)
    first, rest = case.shared_prefix_prompts[:1], case.shared_prefix_prompts[1:]
    assert continuations(llm, first) == expected_for(case, first)
    assert continuations(llm, rest) == expected_for(case, rest)
    stats = llm.llm_engine.get_stats()
    # every later prompt finds at least the prefix's 4 full blocks of 8 tokens in the cache
    assert stats.prefix_cache_hits >= len(rest) * (SHARED_PREFIX_LENGTH // 8) * 8


def test_chunked_prefill(case):
    llm = LLM(model=str(case.checkpoint), num_kv_blocks=256, max_num_batched_tokens=12)
    assert max(PROMPT_LENGTHS) > 12  # the long prompts cannot be prefilled in one step
    assert continuations(llm, case.prompts) == expected_for(case, case.prompts)


def test_preemption_under_a_small_kv_pool(case):
    # block_size 4: the longest request needs 21 blocks, all eight together need far more than 24
    llm = LLM(model=str(case.checkpoint), num_kv_blocks=24, block_size=4, enable_prefix_caching=False)
    assert continuations(llm, case.prompts) == expected_for(case, case.prompts)
    assert llm.llm_engine.get_stats().num_preemptions > 0
