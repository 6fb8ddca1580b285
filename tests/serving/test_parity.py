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


class ReferenceDrafts:
    """Drafts taken from transformers' continuation with about one token in three replaced, so
    verification sees accepted drafts, rejected ones and budget-truncated ones."""

    def __init__(self, expected: dict[tuple[int, ...], list[int]], k: int):
        self.expected, self.k, self.rng = expected, k, random.Random(0)

    def propose(self, request, max_tokens: int) -> list[int]:
        reference = self.expected[tuple(request.prompt_token_ids)]
        drafts = reference[request.num_output_tokens :][: min(self.k, max_tokens)]
        return [t if self.rng.random() < 0.7 else (t + 1) % 49152 for t in drafts]


def test_speculative_decoding_is_token_identical(case):
    # chunked prefill (budget 32 < 71), preemption (24 blocks of 4) and prefix caching, with drafts
    llm = LLM(
        model=str(case.checkpoint),
        num_kv_blocks=24,
        block_size=4,
        max_num_batched_tokens=32,
        speculative_ngram=2,
        num_speculative_tokens=3,
    )
    llm.llm_engine.proposer = ReferenceDrafts(case.expected, k=3)
    assert continuations(llm, case.prompts) == expected_for(case, case.prompts)
    stats = llm.llm_engine.get_stats()
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens
    assert stats.num_preemptions > 0
    assert llm.llm_engine.scheduler.kv_cache_manager.block_pool.num_free_blocks == 24


def test_ngram_drafts_match_plain_decoding_with_biases_and_penalties(case):
    """The real n-gram proposer. logit_bias makes the output a mix of two tokens (so n-grams
    repeat and drafts are partly right); the frequency penalty makes each draft position's
    logits depend on the drafts before it."""
    params = SamplingParams(
        temperature=0.0,
        max_tokens=24,
        ignore_eos=True,
        logit_bias={101: 30.0, 202: 30.0},
        frequency_penalty=0.3,
    )
    plain = LLM(model=str(case.checkpoint), num_kv_blocks=128, block_size=4)
    spec = LLM(
        model=str(case.checkpoint),
        num_kv_blocks=128,
        block_size=4,
        speculative_ngram=2,
        num_speculative_tokens=4,
    )
    prompts = case.prompts[:4]
    expected = [out.outputs[0].token_ids for out in plain.generate(prompts, params)]
    assert [out.outputs[0].token_ids for out in spec.generate(prompts, params)] == expected
    stats = spec.llm_engine.get_stats()
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens
