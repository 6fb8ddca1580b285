"""`--dtype bfloat16` / `float16` on CPU: the engine (weights, KV cache, kernels all in the half
dtype) chooses, at every greedy step, what transformers in the same dtype takes for the best
token, up to a rounding-level near-tie. Slow on CPU, but it is the same code a GPU runs."""

import random

import pytest
import torch
import transformers
from kvpilot.serving import LLM, SamplingParams

NUM_NEW_TOKENS = 10
PROMPT_LENGTHS = (1, 5, 16, 40, 71)
# Two units in the last place of a bf16 logit of magnitude < 16; a wrong token is ~6 below the best.
NEAR_TIE = 0.125


@pytest.mark.parametrize(
    ("arch", "dtype"), [("llama", "bfloat16"), ("qwen3", "bfloat16"), ("llama", "float16")]
)
def test_greedy_steps_agree_with_transformers_in_the_same_dtype(tiny_checkpoints, arch, dtype):
    checkpoint = tiny_checkpoints[arch]
    rng = random.Random(arch)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in PROMPT_LENGTHS]
    llm = LLM(str(checkpoint), dtype=dtype, num_kv_blocks=64)
    runner = llm.llm_engine.model_runner
    assert runner.dtype == getattr(torch, dtype) and runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    greedy = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    ours = [list(out.outputs[0].token_ids) for out in llm.generate(prompts, greedy)]

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, dtype)
    ).eval()
    identical = 0
    with torch.inference_mode():
        for prompt, continuation in zip(prompts, ours, strict=True):
            # transformers' logits at each step of our continuation (teacher-forced)
            logits = reference(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1 : -1].float()
            best = logits.max(dim=1).values
            chosen = logits.gather(1, torch.tensor(continuation)[:, None])[:, 0]
            assert (best - chosen <= NEAR_TIE).all(), (prompt, continuation, (best - chosen).tolist())
            assert (best - logits.median(dim=1).values > 20 * NEAR_TIE).all()  # the tolerance is tight
            generated = reference.generate(
                torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=0
            )
            identical += generated[0, len(prompt) :].tolist() == continuation
    assert identical >= len(prompts) - 2  # only near-ties may make continuations part ways
