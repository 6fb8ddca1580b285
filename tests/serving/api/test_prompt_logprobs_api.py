"""Prompt logprobs over HTTP with the official `openai` client: echo + logprobs (also streamed)
and vLLM's prompt_logprobs (completions and chat), checked against transformers on the tiny
checkpoint."""

import math

import openai
import pytest
import torch
import transformers

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def expected(api_server, tiny_llama):
    """(prompt token ids, transformers' log-softmax rows: row i predicts token i + 1)."""
    ids = api_server.state.engine.tokenizer.encode(PROMPT)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.inference_mode():
        rows = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    return ids, rows


def test_echo_with_logprobs_scores_the_prompt(client, expected):
    ids, rows = expected
    reply = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 3 and choice.text.startswith(PROMPT)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert math.isclose(logprobs.token_logprobs[i], rows[i - 1, ids[i]].item(), abs_tol=1e-4)
        best = rows[i - 1].topk(2).values.tolist()
        assert sorted(logprobs.top_logprobs[i].values(), reverse=True) == pytest.approx(best, abs=1e-4)
    assert all(lp is not None for lp in logprobs.token_logprobs[len(ids) :])
    assert logprobs.text_offset[len(ids)] == len("".join(logprobs.tokens[: len(ids)]))


def test_streamed_echo_sends_the_prompt_logprobs_first(client, expected):
    ids, rows = expected
    stream = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1, stream=True
    )
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    first = chunks[0].logprobs
    assert chunks[0].text.startswith(PROMPT) and first.token_logprobs[0] is None
    assert [round(v, 4) for v in first.token_logprobs[1 : len(ids)]] == [
        round(rows[i - 1, ids[i]].item(), 4) for i in range(1, len(ids))
    ]
    tokens = [t for chunk in chunks for t in chunk.logprobs.tokens]
    offsets = [o for chunk in chunks for o in chunk.logprobs.text_offset]
    assert len(tokens) == len(ids) + 4
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_vllm_prompt_logprobs(client, expected):
    ids, rows = expected
    reply = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 3}
    )
    entries = reply.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for i, entry in enumerate(entries[1:], start=1):
        top = rows[i - 1].topk(3).indices.tolist()
        assert set(entry) == {str(ids[i]), *map(str, top)}
        assert entry[str(ids[i])]["logprob"] == pytest.approx(rows[i - 1, ids[i]].item(), abs=1e-4)
        assert [entry[str(t)]["rank"] for t in top] == [1, 2, 3]
    plain = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=1)
    assert plain.choices[0].model_extra.get("prompt_logprobs") is None
    # with logprobs of the output but no echo, the prompt is in prompt_logprobs only
    both = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=2, logprobs=1, extra_body={"prompt_logprobs": 0}
    )
    assert len(both.choices[0].logprobs.tokens) == 2
    assert [set(e) for e in both.choices[0].model_extra["prompt_logprobs"][1:]] == [{str(t)} for t in ids[1:]]


def test_chat_prompt_logprobs(client):
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        extra_body={"prompt_logprobs": 0},
    )
    entries = chat.model_extra["prompt_logprobs"]
    assert len(entries) == chat.usage.prompt_tokens and entries[0] is None
    # top 0: each entry holds the prompt token alone, ranked only if it is the most likely one
    assert all(len(entry) == 1 and next(iter(entry.values()))["logprob"] <= 0 for entry in entries[1:])
    plain = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert plain.model_extra.get("prompt_logprobs") is None


@pytest.mark.parametrize("value", [-1, 21, "3"])
def test_bad_prompt_logprobs_is_a_400(client, value):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(
            model="tiny-llama", prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": value}
        )
    assert "prompt_logprobs" in str(error.value)
