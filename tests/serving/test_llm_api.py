"""The offline `LLM` API end to end on the tiny Llama checkpoint."""

import pytest
import torch
import transformers
from kvpilot.serving import LLM, SamplingParams

from tests.checkpoints import build_checkpoint

PROMPTS = ["Hello, my name is", "The capital of France is", "One two three four five six seven"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), block_size=4, num_kv_blocks=128, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def test_prompt_forms_and_input_order(llm):
    greedy = SamplingParams(temperature=0, max_tokens=4)
    token_ids = llm.get_tokenizer().encode(PROMPTS[1])
    one_text = llm.generate(PROMPTS[1], greedy)
    one_ids = llm.generate(token_ids, greedy)
    many = llm.generate([PROMPTS[0], token_ids, PROMPTS[2]], greedy)
    assert len(one_text) == len(one_ids) == 1 and len(many) == 3
    assert one_text[0].prompt == PROMPTS[1] and one_ids[0].prompt is None
    assert one_text[0].prompt_token_ids == one_ids[0].prompt_token_ids == token_ids
    assert many[1].prompt_token_ids == token_ids
    assert one_text[0].outputs[0].token_ids == one_ids[0].outputs[0].token_ids == many[1].outputs[0].token_ids
    assert many[0].prompt == PROMPTS[0] and many[2].prompt == PROMPTS[2]
    for out in many:
        (completion,) = out.outputs
        assert out.finished and completion.finish_reason == "length" and len(completion.token_ids) == 4
        assert completion.text == llm.get_tokenizer().decode(completion.token_ids)


def test_greedy_tokens_match_transformers_argmax(llm, hf_model):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6))[0]
    sequence = out.prompt_token_ids + out.outputs[0].token_ids
    logits = hf_logits(hf_model, sequence)
    expected = logits[len(out.prompt_token_ids) - 1 : -1].argmax(dim=-1).tolist()
    assert out.outputs[0].token_ids == expected


def test_logprobs_equal_log_softmax_of_the_model_logits(llm, hf_model):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=5, logprobs=4, ignore_eos=True)
    out = llm.generate(PROMPTS[2], params)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    reference = torch.log_softmax(hf_logits(hf_model, out.prompt_token_ids + completion.token_ids), dim=-1)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        row = reference[len(out.prompt_token_ids) - 1 + step]
        assert token in entry and len(entry) in (4, 5)
        for token_id, logprob in entry.items():
            assert logprob == pytest.approx(float(row[token_id]), abs=2e-4)
        # The reported top 4 are the 4 most likely tokens (up to float noise between near-ties).
        top = sorted(entry.values(), reverse=True)[:4]
        assert top == pytest.approx(row.topk(4).values.tolist(), abs=2e-4)


def test_seeded_output_does_not_depend_on_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=8, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded)[0].outputs[0].token_ids
    crowd = [SamplingParams(max_tokens=5), seeded, SamplingParams(temperature=0, max_tokens=9)]
    batched = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], crowd)[1].outputs[0].token_ids
    other_seed = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=43, max_tokens=8))
    assert batched == alone
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_completions_are_seeded_per_index_and_share_the_prompt_blocks(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=100, max_tokens=6, ignore_eos=True)
    prompt = list(range(1000, 1021))  # 21 tokens: 5 full blocks of 4 shared by the 3 sequences
    stats_before = llm.llm_engine.get_stats()
    (out,) = llm.generate(prompt, params)
    stats_after = llm.llm_engine.get_stats()
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    single_params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=6) for i in range(3)]
    singles = [llm.generate(prompt, p)[0].outputs[0].token_ids for p in single_params]
    assert [c.token_ids for c in out.outputs] == singles
    assert len({tuple(t) for t in singles}) > 1
    # Sequences 1 and 2 found sequence 0's 5 full prompt blocks in the cache.
    assert stats_after.prefix_cache_hits - stats_before.prefix_cache_hits == 2 * 20


def test_stop_string_cuts_the_generated_text(llm):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    full = llm.generate(PROMPTS[1], greedy)[0].outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    index = full.find(stop)
    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=16, stop=stop, include_stop_str_in_output=include)
        completion = llm.generate(PROMPTS[1], params)[0].outputs[0]
        assert completion.finish_reason == "stop" and completion.stop_reason == stop
        assert completion.text == full[: index + (len(stop) if include else 0)]


def test_stats_and_request_times(llm):
    before = llm.llm_engine.get_stats()
    shared = list(range(2000, 2016))  # 4 full blocks
    llm.generate([[*shared, 1], [*shared, 2]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    (out,) = llm.generate([*shared, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    after = llm.llm_engine.get_stats()
    assert after.prompt_tokens - before.prompt_tokens == 3 * 17
    assert after.generation_tokens - before.generation_tokens == 9
    assert after.prefix_cache_queries - before.prefix_cache_queries == 3 * 17
    assert after.prefix_cache_hits - before.prefix_cache_hits == 2 * 16 and out.num_cached_tokens == 16
    assert after.num_running == after.num_waiting == 0 and after.kv_cache_usage == 0.0
    t = out.times
    assert t.arrival <= t.first_scheduled <= t.first_token <= t.last_token <= t.finished


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", SamplingParams(), "prompt: must not be empty"),
        ([], SamplingParams(), "prompt: must not be empty"),
        ([5, 49152], SamplingParams(), "prompt: token id 49152 is outside the vocabulary"),
        ([5, -1], SamplingParams(), "prompt: token id -1"),
        ([1] * 500, SamplingParams(max_tokens=20), r"max_tokens: prompt \(500 tokens\) \+ max_tokens \(20\)"),
        ([1] * 512, SamplingParams(max_tokens=None), "prompt: 512 tokens leave no room"),
        ([1, 2], SamplingParams(logit_bias={50000: 1.0}), "logit_bias: token id 50000"),
    ],
)
def test_bad_requests_are_value_errors_naming_the_problem(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[7, 8], prompt], params)
    stats = llm.llm_engine.get_stats()
    assert stats.num_waiting == 0 and stats.kv_cache_usage == 0.0  # the good prompt was withdrawn
    with pytest.raises(ValueError, match="sampling_params: got 2 for 1 prompts"):
        llm.generate([[1, 2]], [SamplingParams(), SamplingParams()])


def test_checkpoint_without_tokenizer_serves_token_ids(tmp_path):
    directory = build_checkpoint("llama", tmp_path / "no-tokenizer", tokenizer_dir=None)
    llm = LLM(model=str(directory), num_kv_blocks=16)
    assert llm.get_tokenizer() is None
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="prompt: this model has no tokenizer"):
        llm.generate("hello")


def test_duplicate_request_ids_are_rejected_without_side_effects(llm):
    engine = llm.llm_engine
    engine.add_request("dup#1", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id: 'dup#1' is already in the engine"):
        engine.add_request("dup#1", [4, 5], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id: 'dup' is already in the engine"):
        engine.add_request("dup", [4, 5], SamplingParams(n=2, max_tokens=2))  # its 2nd sequence is dup#1
    engine.abort_request("dup#1")
    stats = engine.get_stats()
    assert not engine.has_unfinished() and stats.kv_cache_usage == 0.0


def test_a_step_interrupted_mid_prefill_leaves_no_unwritten_block_in_the_prefix_cache(tiny_llama):
    """Ctrl-C (or an exception) in the forward of a prefill's second chunk: the blocks the step had
    registered for the prefix cache were never written, and the same prompt again hit them."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = list(range(100, 164))  # 16 blocks of 4, prefilled in chunks of 32
    llm = LLM(model=str(tiny_llama), block_size=4, num_kv_blocks=128, max_num_batched_tokens=32)
    reference = llm.generate([prompt], params)[0].outputs[0].token_ids
    llm.llm_engine.reset_prefix_cache()  # start from an empty cache, as after the fix
    runner = llm.llm_engine.model_runner
    forward, calls = runner.execute_model, []

    def interrupted_on_the_second_chunk(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    runner.execute_model = interrupted_on_the_second_chunk
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt], params)
    runner.execute_model = forward
    again = llm.generate([prompt], params)[0]
    assert again.outputs[0].token_ids == reference
    assert llm.llm_engine.scheduler.kv_cache_manager.block_pool.num_free_blocks == 128


def test_a_seeded_sampled_request_gets_the_same_tokens_with_speculation_whatever_the_batch(tiny_llama):
    """How many drafts a step verifies depends on the batch (its token budget, where a chunked
    prefill ends), and so did a seeded request's random draws: seeded sampled requests get no drafts."""
    prompt = [4, 6, 7, 6, 7, 7, 5, 4, 3, 3, 3, 5, 5, 4, 3, 3]  # its last bigram occurs earlier: drafts
    seeded = SamplingParams(temperature=1.0, seed=46, max_tokens=4, ignore_eos=True)
    companion = ([9], SamplingParams(temperature=0, max_tokens=1))
    outputs = []
    for speculation in ({}, {"speculative_ngram": 2, "num_speculative_tokens": 3}):
        llm = LLM(
            model=str(tiny_llama),
            num_kv_blocks=64,
            max_model_len=512,
            max_num_batched_tokens=16,
            **speculation,
        )
        alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
        behind = llm.generate([companion[0], prompt], [companion[1], seeded])[1].outputs[0].token_ids
        outputs += [alone, behind]
    assert all(tokens == outputs[0] for tokens in outputs), outputs
