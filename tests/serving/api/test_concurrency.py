"""Many streams at once, /metrics adding up, and client disconnects freeing their requests."""

import asyncio
import json
import time

import httpx
import openai

from tests.serving.api.conftest import scrape


async def test_32_concurrent_streams_and_metrics_add_up(api_server):
    tokenizer = api_server.state.engine.tokenizer
    before = scrape(api_server.base_url)
    prompts = [f"Request number {i} says:" + " more" * (i % 7) for i in range(32)]
    lengths = [4 + (i * 5) % 23 for i in range(32)]

    async with openai.AsyncOpenAI(base_url=f"{api_server.base_url}/v1", api_key="x", max_retries=0) as client:

        async def one(prompt: str, max_tokens: int):
            stream = await client.completions.create(
                model="tiny-llama",
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0.8,
                seed=len(prompt),
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, usage = "", None
            async for chunk in stream:
                text += "".join(c.text for c in chunk.choices)
                usage = chunk.usage or usage
            return text, usage

        results = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True)))

    for prompt, max_tokens, (text, usage) in zip(prompts, lengths, results, strict=True):
        assert usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert usage.completion_tokens == max_tokens
        assert text
    after = scrape(api_server.base_url)
    delta = {name: after[name] - before.get(name, 0) for name in after}
    assert delta["vllm:prompt_tokens_total"] == sum(u.prompt_tokens for _, u in results)
    assert delta["vllm:generation_tokens_total"] == sum(u.completion_tokens for _, u in results)
    model = 'model_name="tiny-llama"'
    assert delta[f'vllm:request_success_total{{finished_reason="length",{model}}}'] == 32
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta[f"vllm:{histogram}_seconds_count"] == 32
    assert delta["vllm:request_generation_tokens_sum"] == sum(lengths)
    assert delta["vllm:inter_token_latency_seconds_count"] == sum(n - 1 for n in lengths)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:prefix_cache_hits_total"] <= after["vllm:prefix_cache_queries_total"]
    (info,) = [key for key in after if key.startswith("vllm:cache_config_info{")]
    assert after[info] == 1
    for label in (
        'block_size="16"',
        model,
        'num_gpu_blocks="512"',
        'num_gpu_blocks_reason="--num-kv-blocks 512"',
    ):
        assert label in info, info
    assert after["kvpilot_model_weight_bytes"] > 0


async def test_disconnected_requests_are_aborted(api_server):
    idle = scrape(api_server.base_url)
    body = {"model": "tiny-llama", "prompt": "Tell me everything", "max_tokens": 1900, "stream": True}
    body["ignore_eos"] = True

    async with httpx.AsyncClient(base_url=api_server.base_url, timeout=30) as client:

        async def read_a_little_then_leave():
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                seen = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        assert "error" not in json.loads(line[6:])
                        seen += 1
                    if seen == 3:
                        return  # leaving the block closes the connection mid-stream

        async def wait_then_give_up():  # not streaming: the client times out and closes the connection
            try:
                await client.post("/v1/completions", json=body | {"stream": False}, timeout=0.5)
            except httpx.TimeoutException:
                return
            raise AssertionError("a 1900-token completion should not have finished in 0.5 s")

        await asyncio.gather(*(read_a_little_then_leave() for _ in range(10)), wait_then_give_up())
    left = time.monotonic()
    while True:
        now = scrape(api_server.base_url)
        if (
            now["vllm:num_requests_running"] == 0
            and now["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"]
        ):
            break
        assert time.monotonic() - left < 1.0, f"still running a second after the disconnects: {now}"
        await asyncio.sleep(0.02)
    aborted = 'vllm:request_success_total{finished_reason="abort",model_name="tiny-llama"}'
    assert now.get(aborted, 0) - idle.get(aborted, 0) == 11  # aborted, not run to their 1900 tokens
