"""`kvpilot router` in front of real `kvpilot serve` processes, driven with the official openai client."""

import asyncio
import hashlib
import json
import math
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import openai
import pytest
from kvpilot.serving.router.endpoints import Endpoint
from kvpilot.serving.router.health import probe
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.router.conftest import MODEL, Router, free_port, metric, model_config, successes, wait_for

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
    for histogram in ("request_duration_seconds", "time_to_first_token_seconds"):
        assert router.metric(f"kvpilot_router_{histogram}_count", revision="canary") == counted[1]

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
    assert metric(server.url, "vllm:kv_cache_usage_perc") == 0  # and its KV blocks
    wait_for(
        lambda: router.metric("kvpilot_router_requests_total", code="499") == disconnects + 1,
        10,
        "499 counted",
    )
    assert router.metric("kvpilot_router_upstream_inflight", endpoint=server.url) == 0


def test_a_client_that_asks_for_the_usage_chunk_gets_it_and_it_is_metered(router, servers):
    router.configure({"models": [model_config(("all", 100, [servers[0].url]))]})
    metered = router.metric("kvpilot_router_tokens_total", kind="completion")
    chunks = list(
        router.client().completions.create(
            model=MODEL,
            prompt="usage please",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert router.metric("kvpilot_router_tokens_total", kind="completion") == metered + 3


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


def router_series(router) -> list[dict[str, str]]:
    """The labels of every kvpilot_router_* sample on the router's /metrics."""
    text = httpx.get(f"{router.url}/metrics", timeout=10).text
    return [
        sample.labels | {"__name__": sample.name}
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("kvpilot_router_")
    ]


def test_a_reload_removes_the_series_of_endpoints_and_revisions_it_took_away(router, servers):
    first, second = servers
    router.configure({"models": [model_config(("a", 0, [first.url]), ("b", 100, [second.url]))]})
    client = router.client()
    complete(client, "series")
    stream = complete(client, "Keep talking", max_tokens=1500, stream=True, ignore_eos=True)
    next(iter(stream))
    assert router.metric("kvpilot_router_upstream_inflight", revision="b", endpoint=second.url) == 1
    assert router.metric("kvpilot_router_requests_total", revision="b") == 1

    router.configure({"models": [model_config(("a", 100, [first.url]))]})  # b and its endpoint leave
    of_b = [s for s in router_series(router) if s.get("revision") == "b" or s.get("endpoint") == second.url]
    # Only the in-flight gauge of the stream still running stays, at its true value.
    assert [(s["__name__"], s["endpoint"]) for s in of_b] == [
        ("kvpilot_router_upstream_inflight", second.url)
    ]
    assert router.metric("kvpilot_router_upstream_inflight", endpoint=second.url) == 1

    stream.close()  # its last request gone: so is the gauge's series (and the 499 it was metered as)
    wait_for(
        lambda: (
            not [
                s
                for s in router_series(router)
                if s.get("endpoint") == second.url or s.get("revision") == "b"
            ]
        ),
        30,
        "the series of b gone",
    )
    complete(client, "series again")
    assert router.metric("kvpilot_router_requests_total", revision="a", code="200") == 1


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


class FailingUpstream(BaseHTTPRequestHandler):
    """An upstream that is ready but fails every completion: `500` answers 500 before any byte,
    `break` starts a 200 event stream and drops the connection after its first event."""

    protocol_version = "HTTP/1.1"
    mode = "500"
    posts: ClassVar[list[str]] = []
    thaw = threading.Event()  # `freeze`: the process stops after its first event, until thawed

    def do_GET(self) -> None:  # /ready and /metrics
        if self.mode == "freeze" and self.posts:
            self.thaw.wait(60)  # frozen: the probes time out
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.posts.append(self.mode)
        if self.mode in ("500", "429", "html502"):
            json_error = self.mode != "html502"
            body = (
                b'{"error": {"message": "boom", "type": "server_error", "code": "queue_full"}}'
                if json_error
                else b"<html>bad</html>"
            )
            self.send_response(502 if not json_error else int(self.mode))
            self.send_header("content-type", "application/json" if json_error else "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        event = b'data: {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "Hi"}]}\n\n'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))  # no closing chunk: a broken stream
        self.wfile.flush()
        if self.mode == "freeze":
            self.thaw.wait(60)
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


class QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the connections this upstream breaks on purpose


@pytest.fixture
def failing_upstream():
    server = QuietHTTPServer(("127.0.0.1", 0), FailingUpstream)
    FailingUpstream.mode, FailingUpstream.posts = "500", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def configure_beside(router, failing_upstream: str, server) -> None:
    """One revision of the failing upstream and a real server (least-request: ties go at random)."""
    config = model_config(("r", 100, [failing_upstream, server.url]), balancing="least-request")
    router.configure({"models": [config]})
    wait_for(lambda: f"endpoint {failing_upstream} is ready" in router.log(), 30, "probed")


def test_a_5xx_before_the_first_byte_is_retried_once_on_another_endpoint(router, servers, failing_upstream):
    configure_beside(router, failing_upstream, servers[0])
    before, sent = successes(servers[0]), 0
    while not FailingUpstream.posts and sent < 50:
        sent += 1
        assert complete(router.client(), f"retry me {sent}").choices[0].finish_reason == "length"
    assert FailingUpstream.posts and set(FailingUpstream.posts) == {"500"}
    assert successes(servers[0]) == before + sent  # every request answered, the failed ones retried
    assert f"endpoint {failing_upstream} answered 500: ejected for 1 s" in router.log()


def test_the_clients_request_id_comes_back_through_the_router(router, servers):
    router.configure({"models": [model_config(("all", 100, [s.url for s in servers]))]})
    body = {"model": MODEL, "prompt": "trace me", "max_tokens": 2}
    answered = httpx.post(
        f"{router.url}/v1/completions", json=body, headers={"x-request-id": "trace-7"}, timeout=60
    )
    assert answered.status_code == 200 and answered.headers["x-request-id"] == "trace-7"
    refused = httpx.post(f"{router.url}/v1/completions", json={"prompt": "no model"}, timeout=60)
    assert refused.status_code == 400 and len(refused.headers["x-request-id"]) == 32  # the router's own


def test_a_servers_full_queue_429_is_tried_on_another_endpoint_without_ejecting_it(
    router, servers, failing_upstream
):
    """One replica's queue is full (a burst landed on it); another has room: the tenant should not
    see the 429. It is not a failure: the endpoint is not ejected."""
    FailingUpstream.mode = "429"
    configure_beside(router, failing_upstream, servers[0])
    before, sent = successes(servers[0]), 0
    while not FailingUpstream.posts and sent < 50:
        sent += 1
        assert complete(router.client(), f"full queue {sent}").choices[0].finish_reason == "length"
    assert FailingUpstream.posts == ["429"]
    assert successes(servers[0]) == before + sent  # the one it refused was answered by the other
    assert f"endpoint {failing_upstream} answered 429 (its queue is full): trying another" in router.log()
    assert f"endpoint {failing_upstream} answered 429: ejected" not in router.log()


def test_nothing_is_retried_once_the_response_has_started(router, servers, failing_upstream):
    FailingUpstream.mode = "break"
    configure_beside(router, failing_upstream, servers[0])
    before = successes(servers[0]), router.metric("kvpilot_router_requests_total", code="502")
    body = {"model": MODEL, "prompt": "break me", "max_tokens": 4, "stream": True}
    sent, broken = 0, []
    while not FailingUpstream.posts and sent < 50:
        sent += 1
        events = []
        try:
            with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    events += [line] if line.startswith("data: {") else []
        except httpx.HTTPError:
            broken.append(events)
    assert FailingUpstream.posts == ["break"] and len(broken) == 1
    assert len(broken[0]) == 1 and '"text": "Hi"' in broken[0][0]  # the event sent before the break
    wait_for(lambda: router.metric("kvpilot_router_requests_total", code="502") == before[1] + 1, 10, "502")
    assert successes(servers[0]) == before[0] + sent - 1  # the broken one was not sent again
    assert f"stream from {failing_upstream} broke" in router.log()


def test_a_stream_from_a_server_that_froze_ends_with_an_error_instead_of_hanging(router, failing_upstream):
    """The server stops after its first event (SIGSTOP, or its node gone: the connection stays
    open) and its probes time out: after LOST_AFTER_FAILED_PROBES of them the router gives the
    stream up with an error event; before, the client waited forever."""
    FailingUpstream.mode = "freeze"
    FailingUpstream.thaw.clear()
    router.configure({"models": [model_config(("r", 100, [failing_upstream]))]})
    wait_for(lambda: f"endpoint {failing_upstream} is ready" in router.log(), 30, "probed")
    body = {"model": MODEL, "prompt": "freeze", "max_tokens": 4, "stream": True}
    try:
        with pytest.raises(openai.APIError, match="stopped answering"):
            for _ in router.client().completions.create(**body):
                pass
        assert f"endpoint {failing_upstream} stopped answering: giving up its 1 requests" in router.log()
        wait_for(
            lambda: router.metric("kvpilot_router_requests_total", model=MODEL, code="502") >= 1, 10, "502"
        )
    finally:
        FailingUpstream.thaw.set()


def test_a_5xx_page_that_is_not_json_reaches_the_client_as_an_openai_error(router, failing_upstream):
    """A proxy's HTML 502 from the last endpoint to ask: the client gets the same status with an
    OpenAI-style body (a server's own JSON error is passed on as it is)."""
    FailingUpstream.mode = "html502"
    router.configure({"models": [model_config(("r", 100, [failing_upstream]))]})
    wait_for(lambda: f"endpoint {failing_upstream} is ready" in router.log(), 30, "probed")
    with pytest.raises(openai.APIStatusError) as raised:
        complete(router.client(), "html please")
    assert raised.value.status_code == 502 and FailingUpstream.posts == ["html502"]
    error = raised.value.body
    assert error["code"] == "upstream_error" and "HTTP 502 (text/html)" in error["message"]


def test_sigterm_answers_the_held_requests_and_the_router_exits(tmp_path):
    """A held request (no ready endpoint) gets its 503 at once when the router is told to stop;
    before, it waited out activation.timeout (300 s), past any pod's grace period."""
    nowhere = f"http://127.0.0.1:{free_port()}"  # never ready: requests for the model are held
    router = Router(tmp_path, {"models": [model_config(("r", 100, [nowhere]))]}).start().wait_ready()
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(complete, router.client(), "hold me")
            wait_for(lambda: router.metric("kvpilot_router_queued_requests", model=MODEL) == 1, 30, "held")
            router.process.terminate()
            with pytest.raises(openai.APIStatusError) as raised:
                held.result(timeout=30)
        assert raised.value.status_code == 503 and "shutting down" in raised.value.body["message"]
        assert router.process.wait(30) == -signal.SIGTERM  # uvicorn re-raises it once shut down
    finally:
        router.kill()


async def probed(url: str, ready: bool = False) -> Endpoint:
    endpoint = Endpoint(url, ready=ready)
    async with httpx.AsyncClient() as client:
        await probe(client, endpoint)
    return endpoint


def test_the_prober_reads_readiness_and_load_from_a_real_server(servers):
    server = servers[1]
    body = {"model": MODEL, "prompt": "Keep going", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        chunks = response.iter_raw()  # kept: a dropped iterator closes the stream
        next(chunks)  # running: it holds KV blocks
        endpoint = asyncio.run(probed(server.url))
    assert endpoint.ready and endpoint.kv_cache_usage > 0 and endpoint.num_requests_waiting == 0
    assert not asyncio.run(probed(f"http://127.0.0.1:{free_port()}", ready=True)).ready  # nobody there


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
    assert scoped.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as hidden_card:
        scoped.models.retrieve("tiny-other")  # served, but not to this tenant: as if it did not exist
    assert hidden_card.value.body["code"] == "model_not_found"
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
    assert absent.json()["error"]["code"] == "model_not_found"
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


def test_a_stream_left_before_its_usage_chunk_is_still_charged(router, servers):
    """The usage chunk comes last: a client leaving before it made the stream free of
    tokensPerMinute. It is charged an estimate (an event a token, 4 request bytes a token)."""
    key = "leaver-key"
    tenant = {
        "name": "leaver",
        "keySha256": hashlib.sha256(key.encode()).hexdigest(),
        "tokensPerMinute": 10**6,
    }
    router.configure({"models": [model_config(("all", 100, [s.url for s in servers]))], "tenants": [tenant]})
    body = {
        "model": MODEL,
        "prompt": "Count my tokens",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{router.url}/v1/completions", json=body, headers=headers, timeout=60
    ) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: {")
            if events == 3:
                break  # the client leaves mid-stream
    charged = lambda kind: router.metric("kvpilot_router_tokens_total", tenant="leaver", kind=kind)  # noqa: E731
    wait_for(lambda: charged("completion") >= 3, 30, "the left stream charged")
    assert charged("prompt") >= len(json.dumps(body)) // 4
    wait_for(
        lambda: router.metric("kvpilot_router_requests_total", tenant="leaver", code="499") == 1, 30, "499"
    )


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
