"""`prompt_logprobs` (vLLM's extra) and `echo` with `logprobs` on the real server: the prompt's
logprobs are those of the offline engine, in OpenAI's and vLLM's formats."""

import openai
import pytest
from kvpilot.serving import LLM, SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=64)
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]


def test_echo_with_logprobs_scores_the_prompt(client, offline):
    response = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=2, temperature=0, echo=True, logprobs=2
    )
    logprobs = response.choices[0].logprobs
    num_prompt = len(offline.prompt_token_ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = [
        entry[token]
        for entry, token in zip(offline.prompt_logprobs[1:], offline.prompt_token_ids[1:], strict=True)
    ]
    assert logprobs.token_logprobs[1:num_prompt] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 2 for top in logprobs.top_logprobs[1:])
    assert len(logprobs.tokens) == num_prompt + 2


def test_prompt_logprobs_field(client, offline):
    response = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    body = response.choices[0].model_extra["prompt_logprobs"]
    assert body[0] is None and len(body) == len(offline.prompt_token_ids)
    for entry, expected in zip(body[1:], offline.prompt_logprobs[1:], strict=True):
        assert {int(t): v["logprob"] for t, v in entry.items()} == pytest.approx(expected, abs=1e-4)
        assert all(v["decoded_token"] for v in entry.values())
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        extra_body={"prompt_logprobs": 0},
    )
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
