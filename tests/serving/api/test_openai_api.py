"""The real server driven by the official `openai` client: completions, chat, streams, n, stop, logprobs."""

import math

import httpx
import openai
import pytest
from kvpilot.serving import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
async def async_client(api_server):  # per test: its connections belong to the test's event loop
    async with openai.AsyncOpenAI(
        base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(api_server):
    return api_server.state.engine.tokenizer


def test_models_health_version(api_server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    assert models[0].model_extra["max_model_len"] == 2048
    assert httpx.get(f"{api_server.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{api_server.base_url}/ready").status_code == 200
    assert httpx.get(f"{api_server.base_url}/version").json()["version"]


def test_every_answer_carries_the_clients_request_id_or_its_own(client, api_server):
    """The openai client reads x-request-id into `_request_id` (what a support case asks for)."""
    body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 2}
    raw = client.with_options(
        default_headers={"x-request-id": "trace-42"}
    ).completions.with_raw_response.create(**body)
    assert raw.headers["x-request-id"] == "trace-42" and raw.parse()._request_id == "trace-42"
    generated = [
        client.completions.with_raw_response.create(**body).headers["x-request-id"] for _ in range(2)
    ]
    assert generated[0] != generated[1] and all(len(rid) == 32 for rid in generated)
    unsafe = httpx.post(f"{api_server.base_url}/v1/models", headers={"x-request-id": "a b"})  # 405, still
    assert unsafe.headers["x-request-id"] != "a b" and len(unsafe.headers["x-request-id"]) == 32


def test_models_retrieve(client):
    """`client.models.retrieve` reads GET /v1/models/{id}: the card /v1/models lists; an unknown
    id (a slash in it too) gets OpenAI's 404."""
    model = client.models.retrieve("tiny-llama")
    listed = client.models.list().data[0]
    assert model.model_dump(exclude={"created"}) == listed.model_dump(exclude={"created"})
    assert model.id == "tiny-llama" and model.model_extra["max_model_len"] == 2048
    for unknown in ("gpt-4", "org/tiny-llama"):
        with pytest.raises(openai.NotFoundError) as raised:
            client.models.retrieve(unknown)
        error = raised.value.body
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            "model",
            "model_not_found",
        )
        assert unknown in error["message"]


def test_completion_usage_and_finish_reason(client, tokenizer):
    reply = client.completions.create(
        model="tiny-llama", prompt=PROMPTS[0], max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = reply.choices[0]
    assert reply.object == "text_completion" and reply.model == "tiny-llama"
    assert choice.finish_reason == "length" and choice.text
    assert reply.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[0]))
    assert reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


def test_chat_renders_the_template(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    reply = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=5, temperature=0)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert 1 <= reply.usage.completion_tokens <= 5


async def test_streaming_equals_non_streaming_with_usage(async_client):
    kwargs = dict(model="tiny-llama", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    whole = await async_client.completions.create(**kwargs)
    stream = await async_client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason
    assert usage.model_dump() == whole.usage.model_dump()


async def test_chat_streaming_with_usage(async_client):
    messages = [{"role": "user", "content": "Count to five"}]
    whole = await async_client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=10, temperature=0
    )
    stream = await async_client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_n2_and_seeds(client):
    kwargs = dict(model="tiny-llama", prompt=PROMPTS[2], max_tokens=10, temperature=1.5, n=2, seed=1234)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert 2 <= first.usage.completion_tokens <= 20


def test_chat_seed_is_reproducible(client):
    kwargs = dict(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Tell a story"}],
        max_tokens=12,
        temperature=1.2,
    )
    texts = {client.chat.completions.create(**kwargs, seed=7).choices[0].message.content for _ in range(2)}
    assert len(texts) == 1


def test_stop_string_cuts_the_text(client):
    kwargs = dict(model="tiny-llama", prompt=PROMPTS[3], max_tokens=16, temperature=0)
    full = client.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"degenerate output {full!r}"
    cut = client.completions.create(**kwargs, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_null_means_the_default(client):
    """The openai client sends `null` for an argument passed as None; OpenAI's API reads it as not
    given, and so does the server (even for fields whose own type has no null)."""
    nulls = dict(
        n=None,
        temperature=None,
        top_p=None,
        presence_penalty=None,
        frequency_penalty=None,
        stop=None,
        seed=None,
        user=None,
        stream=None,
        stream_options=None,
    )
    reply = client.completions.create(
        model="tiny-llama", prompt=PROMPTS[0], max_tokens=3, logprobs=None, echo=None, **nulls
    )
    assert [c.index for c in reply.choices] == [0] and reply.choices[0].logprobs is None
    assert not reply.choices[0].text.startswith(PROMPTS[0]) and reply.usage.completion_tokens <= 3
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=3,
        max_tokens=None,
        logprobs=None,
        top_logprobs=None,
        parallel_tool_calls=None,
        **nulls,
    )
    assert [c.index for c in chat.choices] == [0] and chat.choices[0].logprobs is None
    assert chat.usage.completion_tokens <= 3


def test_a_tiny_temperature_decodes_greedily(client):
    kwargs = dict(model="tiny-llama", prompt=PROMPTS[1], max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    assert client.completions.create(**kwargs, temperature=1e-38).choices[0].text == greedy
    assert client.completions.create(**kwargs, temperature=1e-300).choices[0].text == greedy


def test_completion_logprobs(client):
    reply = client.completions.create(
        model="tiny-llama",
        prompt=PROMPTS[0],
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert len(top) == 3 and logprob <= 0
        assert math.isclose(max(top.values()), logprob, rel_tol=1e-6)  # greedy: the sampled token is the best
        assert top[token] == logprob


def test_chat_logprobs(client):
    reply = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, rel_tol=1e-6)
        assert bytes(entry.bytes).decode() == entry.token


@pytest.mark.parametrize("reply", ["😀", "Hi there"])
def test_chat_logprobs_bytes_rebuild_the_text(client, reply):
    """Each token's own bytes: several tokens spell 😀, none of them a whole character, and their
    bytes joined are the reply's (each decoded alone would read U+FFFD). The closing EOS adds none."""
    completion = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Smile"}],
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        extra_body={"structured_outputs": {"regex": reply}},
    )
    choice = completion.choices[0]
    assert choice.message.content == reply
    assert b"".join(bytes(entry.bytes) for entry in choice.logprobs.content) == reply.encode()


async def test_completion_text_offsets_point_into_the_text(async_client):
    """`text_offset` counts characters of the returned text: the tokens that spell parts of 😀
    point at it; streamed chunks and an echoed prompt keep the same offsets."""
    prompt, reply = "Smile", "😀 ok"
    kwargs = dict(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        logprobs=1,
        extra_body={"structured_outputs": {"regex": reply}},
    )
    whole = (await async_client.completions.create(**kwargs)).choices[0]
    assert whole.text == reply
    tokens, offsets = whole.logprobs.tokens, whole.logprobs.text_offset
    for token, offset in zip(tokens, offsets, strict=True):
        if "\ufffd" in token:  # a part of 😀
            assert whole.text[offset] == "😀"
        elif token != "<|im_end|>":
            assert whole.text[offset : offset + len(token)] == token
    assert offsets == sorted(offsets) and offsets[-1] == len(reply)  # EOS last, after the text
    stream = await async_client.completions.create(**kwargs, stream=True)
    streamed = [o async for chunk in stream for o in chunk.choices[0].logprobs.text_offset]
    assert streamed == offsets
    echoed = (await async_client.completions.create(**kwargs, echo=True)).choices[0].logprobs
    assert echoed.text_offset[-len(offsets) :] == [len(prompt) + o for o in offsets]


def test_echo_and_token_prompts(client, tokenizer):
    ids = tokenizer.encode(PROMPTS[1])
    by_text = client.completions.create(
        model="tiny-llama", prompt=PROMPTS[1], max_tokens=4, temperature=0, echo=True
    )
    by_ids = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=4, temperature=0)
    assert by_text.choices[0].text == PROMPTS[1] + by_ids.choices[0].text
    batch = client.completions.create(model="tiny-llama", prompt=[ids, ids[:2]], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_ids.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + 2


def test_greedy_http_output_equals_offline_llm(client, tiny_llama):
    llm = LLM(model=str(tiny_llama), num_kv_blocks=256)
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12))
    for prompt, expected in zip(PROMPTS, offline, strict=True):
        reply = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0)
        assert reply.choices[0].text == expected.outputs[0].text
        assert reply.choices[0].finish_reason == expected.outputs[0].finish_reason
        assert reply.usage.completion_tokens == len(expected.outputs[0].token_ids)


async def test_streaming_two_prompts_n2(async_client, tokenizer):
    stream = await async_client.completions.create(
        model="tiny-llama",
        prompt=PROMPTS[:2],
        n=2,
        max_tokens=5,
        temperature=1.0,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1, 2, 3] and all(texts.values())
    assert finish == {i: "length" for i in range(4)}
    assert usage.completion_tokens == 4 * 5
    assert usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in PROMPTS[:2])
