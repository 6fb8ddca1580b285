"""`kvpilot router` in front of real `kvpilot serve` processes, driven with the official openai client."""

import hashlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.serving.router.conftest import MODEL, free_port, metric, model_config, successes, wait_for

pytestmark = pytest.mark.timeout(300)

SYSTEM_PROMPTS = [f"You are assistant number {i}. " + "Answer briefly and precisely. " * 24 for i in range(2)]


def complete(
    client: openai.OpenAI, prompt: str = "Hello", max_tokens: int = 1, stream: bool = False, **extra
):
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=stream, extra_body=extra
    )


def chat(client: openai.OpenAI, system: str, question: str, **kwargs):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def test_the_router_process_never_imports_torch(router):
    imported = [
        line.rsplit("|", 1)[1].strip()
        for line in router.log().splitlines()
        if line.startswith("import time:")
    ]
    assert (
        "kvpilot.serving.router.app" in imported and "uvicorn" in imported
    )  # it started, and we see its imports
    heavy = [name for name in imported if name.split(".")[0] in ("torch", "transformers", "numpy")]
    assert heavy == []
    assert (
        httpx.get(f"{router.url}/health").status_code == 200
        and httpx.get(f"{router.url}/ready").status_code == 200
    )
    assert [m.id for m in router.client().models.list().data] == [MODEL]


def test_revision_weights_split_requests_counted_at_the_servers(router, servers):
    first, second = servers
    router.configure({"models": [model_config(("stable", 70, [first.url]), ("canary", 30, [second.url]))]})
    client = router.client()
    before = successes(first), successes(second)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: complete(client, f"weights {i}"), range(50)))
    counted = successes(first) - before[0], successes(second) - before[1]
    assert abs(counted[0] - 35) <= 2 and sum(counted) == 50, counted
    assert router.metric("kvpilot_router_requests_total", revision="canary", code="200") == counted[1]

    router.configure({"models": [model_config(("stable", 100, [first.url]), ("canary", 0, [second.url]))]})
    before = successes(first), successes(second)
    for i in range(6):
        complete(client, f"drained {i}")
    assert (successes(first) - before[0], successes(second) - before[1]) == (6, 0)


def test_prefix_affinity_then_bounded_load_spill(router, servers):
    router.configure({"models": [model_config(("all", 100, [s.url for s in servers]), balancing="prefix")]})
    client = router.client()
    homes = []
    for system in SYSTEM_PROMPTS:
        before = [successes(s) for s in servers]
        for i in range(5):
            chat(client, system, f"question {i}", max_tokens=1)
        counted = [successes(s) - b for s, b in zip(servers, before, strict=True)]
        assert sorted(counted) == [0, 5], counted  # every request with this prefix on one server
        homes.append(servers[counted.index(5)])

    home = homes[0]
    other = next(s for s in servers if s is not home)
    streams = []
    try:
        for i in range(4):  # held open: the home server takes them until over ceil(1.25 x mean)
            stream = chat(
                client,
                SYSTEM_PROMPTS[0],
                f"long {i}",
                max_tokens=1500,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            next(iter(stream))
            streams.append(stream)
        running = [metric(s.url, "vllm:num_requests_running") for s in (home, other)]
        assert running == [3, 1]
        inflight = [router.metric("kvpilot_router_upstream_inflight", endpoint=s.url) for s in (home, other)]
        assert inflight == [3, 1]
    finally:
        for stream in streams:
            stream.close()


def test_a_client_disconnect_aborts_the_request_on_the_server(router, servers):
    router.configure({"models": [model_config(("all", 100, [servers[0].url]))]})
    server = servers[0]
    aborted = metric(server.url, "vllm:request_success_total", finished_reason="abort")
    disconnects = router.metric("kvpilot_router_requests_total", code="499")
    stream = complete(router.client(), "Keep talking", max_tokens=1500, stream=True, ignore_eos=True)
    chunks = [next(iter(stream)) for _ in range(3)]
    assert all(chunk.choices[0].text is not None for chunk in chunks)
    assert metric(server.url, "vllm:num_requests_running") == 1
    stream.close()
    wait_for(
        lambda: metric(server.url, "vllm:request_success_total", finished_reason="abort") == aborted + 1,
        30,
        "abort",
    )
    wait_for(lambda: metric(server.url, "vllm:num_requests_running") == 0, 30, "the server freed the request")
    wait_for(
        lambda: router.metric("kvpilot_router_requests_total", code="499") == disconnects + 1,
        10,
        "499 counted",
    )
    assert router.metric("kvpilot_router_upstream_inflight", endpoint=server.url) == 0


def test_config_reload_keeps_requests_in_flight_and_a_bad_config_keeps_the_last_good_one(router, servers):
    first, second = servers
    router.configure({"models": [model_config(("one", 100, [first.url]))]})
    client = router.client()
    results: list[tuple[str, str | None]] = []
    started = threading.Barrier(4)

    def stream(i: int) -> None:
        response = complete(client, f"in flight {i}", max_tokens=60, stream=True, ignore_eos=True)
        text, finish = "", None
        for n, chunk in enumerate(response):
            if n == 0:
                started.wait(60)
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        results.append((text, finish))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    started.wait(60)
    router.configure({"models": [model_config(("two", 100, [second.url]))]})  # the first server leaves
    for thread in threads:
        thread.join(120)
    assert [finish for _, finish in results] == ["length"] * 3 and all(text for text, _ in results)
    before = successes(first), successes(second)
    for i in range(3):
        complete(client, f"after reload {i}")
    assert (successes(first) - before[0], successes(second) - before[1]) == (0, 3)

    errors = router.metric("kvpilot_router_config_reloads_total", result="error")
    router.write("models:\n- name: tiny\n  revisions:\n  - name: two\n    weight: -5\n")
    wait_for(
        lambda: router.metric("kvpilot_router_config_reloads_total", result="error") == errors + 1,
        30,
        "error",
    )
    assert router.metric("kvpilot_router_config_last_reload_successful") == 0
    assert "keeping the last good config" in router.log() and "models[0].revisions[0].weight" in router.log()
    assert complete(client, "still served").choices[0].finish_reason == "length"


def test_scale_from_zero_holds_requests_until_a_server_is_ready(router, spare_server):
    cold_port = free_port()  # nothing ever listens here
    cold = model_config(("r", 100, [f"http://127.0.0.1:{cold_port}"]), activation={"timeout": "1s"})
    cold["name"] = "cold"
    warming = model_config(("r", 100, [spare_server.url]), activation={"timeout": "240s", "maxQueued": 3})
    router.configure({"models": [warming, cold]})
    client = router.client()

    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as timed_out:
        client.completions.create(model="cold", prompt="anyone?", max_tokens=1)
    assert timed_out.value.status_code == 503 and time.monotonic() - started >= 1
    assert timed_out.value.body["code"] == "no_ready_endpoint"

    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(complete, client, f"held {i}", 2) for i in range(3)]
        wait_for(lambda: router.metric("kvpilot_router_queued_requests", model=MODEL) == 3, 30, "3 held")
        with pytest.raises(openai.RateLimitError) as full:
            complete(client, "one too many")
        assert full.value.response.headers["retry-after"].isdigit()
        assert full.value.body["code"] == "rate_limit_exceeded"
        assert not any(future.done() for future in held)
        spare_server.start()
        answers = [future.result(timeout=240) for future in held]
    assert [answer.choices[0].finish_reason for answer in answers] == ["length"] * 3
    assert router.metric("kvpilot_router_queued_requests", model=MODEL) == 0


def test_failover_when_a_server_is_killed(router, servers, spare_server):
    spare_server.start().wait_ready()
    survivor = servers[0]
    router.configure(
        {"models": [model_config(("all", 100, [survivor.url, spare_server.url]), balancing="least-request")]}
    )
    client = router.client()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(complete, client, f"failover {i}", 24, ignore_eos=True) for i in range(24)]
        wait_for(
            lambda: router.metric("kvpilot_router_upstream_inflight", endpoint=spare_server.url) >= 1,
            60,
            "busy",
        )
        spare_server.kill()
        answers = [future.result(timeout=240) for future in futures]  # none lost: none had started streaming
    assert [a.usage.completion_tokens for a in answers] == [24] * 24
    assert "ejected" in router.log()


def test_tenants_keys_models_and_rate_limits(router, servers, tmp_path):
    keys = {"rpm": "sk-rpm-0123456789", "tpm": "sk-tpm-abcdefghij", "scoped": "sk-scoped-zyxwvut"}
    (tmp_path / "tpm-key").write_text(keys["tpm"] + "\n")
    other = model_config(("r", 100, [servers[0].url]))
    other["name"] = "tiny-other"
    router.configure(
        {
            "models": [model_config(("all", 100, [s.url for s in servers])), other],
            "tenants": [
                {
                    "name": "rpm",
                    "keySha256": hashlib.sha256(keys["rpm"].encode()).hexdigest(),
                    "requestsPerMinute": 3,
                },
                {"name": "tpm", "keyFile": str(tmp_path / "tpm-key"), "tokensPerMinute": 60},
                {
                    "name": "scoped",
                    "keySha256": hashlib.sha256(keys["scoped"].encode()).hexdigest(),
                    "models": [MODEL],
                },
            ],
        }
    )
    for key in ("wrong", keys["rpm"] + "x"):
        with pytest.raises(openai.AuthenticationError) as denied:
            complete(router.client(key))
        assert denied.value.body["code"] == "invalid_api_key"
    assert httpx.post(f"{router.url}/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401

    scoped = router.client(keys["scoped"])
    assert [m.id for m in scoped.models.list().data] == [MODEL]
    hidden = httpx.post(
        f"{router.url}/v1/completions",
        json={"model": "tiny-other", "prompt": "x"},
        headers={"Authorization": f"Bearer {keys['scoped']}"},
    )
    absent = httpx.post(
        f"{router.url}/v1/completions",
        json={"model": "tiny-nope", "prompt": "x"},
        headers={"Authorization": f"Bearer {keys['scoped']}"},
    )
    assert hidden.status_code == absent.status_code == 404
    assert hidden.json()["error"] == absent.json()["error"] | {
        "message": absent.json()["error"]["message"].replace("tiny-nope", "tiny-other")
    }
    assert complete(scoped).choices  # its own model works

    rpm = router.client(keys["rpm"])
    first_admitted = time.monotonic()
    for _ in range(3):
        complete(rpm)
    with pytest.raises(openai.RateLimitError) as limited:
        complete(rpm)
    elapsed = time.monotonic() - first_admitted
    assert limited.value.body["code"] == "rate_limit_exceeded" and limited.value.body["type"] == "requests"
    retry_after = int(limited.value.response.headers["retry-after"])
    assert math.ceil(20 - elapsed) <= retry_after <= 20  # 3 per minute: one back every 20 s

    tpm = router.client(keys["tpm"])  # 60 tokens per minute: one back every second
    started = time.monotonic()
    usage = complete(tpm, "Count my tokens", max_tokens=30, ignore_eos=True).usage
    used_per_request = usage.prompt_tokens + usage.completion_tokens
    chunks = list(complete(tpm, "Count my tokens", max_tokens=30, ignore_eos=True, stream=True))
    assert (
        all(chunk.usage is None for chunk in chunks) and chunks[-1].choices
    )  # the usage chunk it did not ask for is gone
    metered = router.metric("kvpilot_router_tokens_total", tenant="tpm")
    assert metered == 2 * used_per_request
    with pytest.raises(openai.RateLimitError) as limited:
        complete(tpm)
    elapsed = time.monotonic() - started
    assert limited.value.body["type"] == "tokens"
    deficit = 2 * used_per_request - 60  # the bucket started full; tokens come back at 1 per second
    retry_after = int(limited.value.response.headers["retry-after"])
    assert max(1, math.ceil(deficit - elapsed)) <= retry_after <= math.ceil(deficit)

    exposed = router.log() + httpx.get(f"{router.url}/metrics").text
    assert not [name for name, key in keys.items() if key in exposed]
    assert 'tenant="tpm"' in exposed


def test_malformed_bodies_get_openai_errors_and_never_reach_a_server(router, servers):
    router.configure({"models": [model_config(("all", 100, [s.url for s in servers]))]})
    url = f"{router.url}/v1/completions"
    cases = [
        (b'{"model": "tiny", "prompt": ', 400, None, "invalid JSON body"),
        (b"[1, 2]", 400, None, "must be a JSON object"),
        (b'{"prompt": "no model"}', 400, "model", "you must provide a model parameter"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400, "max_tokens", "max_tokens:"),
        (b'{"model": "tiny", "prompt": "' + b"x" * 70000 + b'"}', 413, None, "larger than 65536 bytes"),
    ]
    refused = router.metric("kvpilot_router_requests_total", revision="")  # answered by the router itself
    answered = [successes(s) for s in servers]
    for body, code, param, message in cases:
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (code, param) and message in error["message"], error
    assert router.metric("kvpilot_router_requests_total", revision="") == refused + len(cases)
    assert [successes(s) for s in servers] == answered
    assert router.metric("kvpilot_router_requests_total", revision="", code="413") == 1
    assert complete(router.client()).choices[0].finish_reason == "length"
