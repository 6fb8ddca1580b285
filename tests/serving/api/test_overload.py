"""A second server with --max-queue-len 4, --max-num-seqs 2, --api-key: 401s, 429s, 400 for a request
with more sequences than the queue holds, drain with a timeout."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from tests.serving.api.conftest import ServerThread, tiny_settings

API_KEY = "sekret"


@pytest.fixture(scope="module")
def small_server(tiny_llama):
    settings = tiny_settings(tiny_llama, max_queue_len=4, max_num_seqs=2, api_key=API_KEY)
    server = ServerThread(settings).start()
    yield server
    server.stop()


def test_api_key(small_server):
    url = small_server.base_url
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.post(f"{url}/v1/completions", content="{bad json").status_code == 401  # the key comes first
    for probe in ("/health", "/ready", "/metrics", "/version"):  # probes and scrapers need no key
        assert httpx.get(f"{url}{probe}").status_code == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    assert client.completions.create(**body).usage.completion_tokens >= 1


async def test_burst_over_the_queue_gets_429_with_retry_after(small_server):
    kwargs = dict(model="tiny-llama", prompt="Overload test:", max_tokens=24, temperature=0)
    kwargs["extra_body"] = {"ignore_eos": True}
    async with openai.AsyncOpenAI(
        base_url=f"{small_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    ) as client:
        expected = (await client.completions.create(**kwargs)).choices[0].text

        async def one():
            try:
                return await client.completions.create(**kwargs)
            except openai.RateLimitError as exc:
                return exc

        results = await asyncio.gather(*(one() for _ in range(40)))
    rejected = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, openai.RateLimitError)]
    assert len(rejected) + len(served) == 40
    assert rejected, "40 requests at once against 2 slots + a queue of 4 must overflow"
    assert len(served) >= 4
    for exc in rejected:
        assert exc.status_code == 429
        assert int(exc.response.headers["retry-after"]) >= 1
        assert exc.body["code"] == "queue_full"
    for reply in served:
        assert reply.choices[0].text == expected
        assert reply.usage.completion_tokens == 24


def test_a_request_counts_its_sequences_against_the_queue(small_server):
    """Each prompt x n waits for its own batch slot: more than --max-queue-len (4) in one request
    can never be admitted (400 naming the field; a 429 would be retried forever)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    base = {"model": "tiny-llama", "max_tokens": 2}
    cases = [
        ("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"]}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, "prompt"),
        ("/v1/completions", {"prompt": "a", "n": 5}, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 5}, "n"),
    ]
    for path, body, param in cases:
        response = httpx.post(f"{small_server.base_url}{path}", json=base | body, headers=headers, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param)
        assert "--max-queue-len 4" in error["message"]
    fits = base | {"prompt": ["a", "b"], "n": 2}  # 4 sequences: exactly what the queue holds
    response = httpx.post(f"{small_server.base_url}/v1/completions", json=fits, headers=headers, timeout=60)
    assert response.status_code == 200 and len(response.json()["choices"]) == 4


async def test_a_full_queue_counts_sequences_not_requests(small_server):
    """Two long streams hold both batch slots; a request with n=3 then waits (3 sequences of the
    4 the queue holds): one adding 2 more gets 429, though only one request waits."""
    short = dict(model="tiny-llama", prompt="Queued:", max_tokens=2)
    async with openai.AsyncOpenAI(
        base_url=f"{small_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    ) as client:
        long = dict(
            model="tiny-llama", prompt="Long story:", max_tokens=1900, extra_body={"ignore_eos": True}
        )
        streams = [await client.completions.create(**long, stream=True) for _ in range(2)]
        for stream in streams:
            await anext(aiter(stream))  # running
        queued = asyncio.create_task(client.completions.create(**short, n=3))
        deadline = time.monotonic() + 30
        while small_server.state.engine.num_waiting < 3:
            assert time.monotonic() < deadline and not queued.done()
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as raised:
            await client.completions.create(**short, n=2)
        assert raised.value.body["code"] == "queue_full"
        for stream in streams:
            await stream.close()  # aborts them: the queued request gets the slots
        assert len((await queued).choices) == 3


def test_drain_timeout_aborts_with_a_final_error_chunk(small_server):
    """Runs last in this module: it leaves the server draining."""
    body = {
        "model": "tiny-llama",
        "prompt": "Long story:",
        "max_tokens": 1900,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    events: list[list[str]] = [[] for _ in range(3)]
    started = [threading.Event() for _ in range(3)]

    def stream(i: int) -> None:
        with httpx.stream(
            "POST", f"{small_server.base_url}/v1/completions", json=body, headers=headers, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events[i].append(line[6:])
                    started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    # two run (max_num_seqs 2), the third has been accepted and waits in the queue
    while sum(event.is_set() for event in started) < 2 or small_server.state.num_accepted < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    small_server.run_coroutine(small_server.state.drain(timeout=0.2))
    for thread in threads:
        thread.join(30)
    for received in events:  # the running two and the queued one: each ends with an error, then [DONE]
        assert received[-1] == "[DONE]"
        error = json.loads(received[-2])["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "server_draining"
    assert httpx.get(f"{small_server.base_url}/ready").status_code == 503
    response = httpx.post(f"{small_server.base_url}/v1/completions", json=body, headers=headers)
    assert response.status_code == 503 and response.json()["error"]["code"] == "server_draining"
