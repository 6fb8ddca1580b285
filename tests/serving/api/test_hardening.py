"""A hostile tenant against a real `kvpilot serve` process: oversized bodies get 413 while they
arrive, text that cannot fit the context a 400 before any tokenizer runs, a long prompt being
tokenized does not hold up other requests, and invalid Unicode is a 400 naming the field."""

import json
import statistics
import threading
import time

import httpx
import pytest

from tests.serving.api.conftest import ServeProcess

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
DEFAULT_MAX_REQUEST_BYTES = 4 << 20
SMALL = {"prompt": "hi", "max_tokens": 1}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening") / "server.log"
    args = ["--model", str(tiny_llama), "--num-kv-blocks", "512", "--no-access-log"]
    process = ServeProcess(args, log).start()
    yield process
    assert process.stop() == 0


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, param: str | None, code: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    return error


def test_a_body_over_the_limit_is_413_whether_its_length_is_declared_or_not(http):
    too_large = b" " * (DEFAULT_MAX_REQUEST_BYTES + 1)
    headers = {"content-type": "application/json"}
    declared = http.post(COMPLETIONS, content=too_large, headers=headers)
    error = assert_openai_error(declared, 413, None, "request_too_large")
    assert f"{DEFAULT_MAX_REQUEST_BYTES + 1} bytes" in error["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for start in range(0, len(too_large), 1 << 16):
            yield too_large[start : start + (1 << 16)]

    streamed = http.post(COMPLETIONS, content=chunked(), headers=headers)
    assert_openai_error(streamed, 413, None, "request_too_large")
    just_under = json.dumps(SMALL | {"user": "u" * (DEFAULT_MAX_REQUEST_BYTES - 200)})
    assert http.post(COMPLETIONS, content=just_under, headers=headers).status_code == 200
    assert http.post(COMPLETIONS, json=SMALL).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, {"prompt": "x" * 3_000_000}, "prompt"),
        (COMPLETIONS, {"prompt": ["hi", "x" * 3_000_000]}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "x" * 2_000_000}] * 2}, "messages"),
    ],
)
def test_text_that_cannot_fit_the_context_is_a_400_before_tokenizing(http, path, body, param):
    error = assert_openai_error(http.post(path, json=body), 400, param, "context_length_exceeded")
    assert "characters cannot fit max_model_len = 2048 tokens" in error["message"]


def test_token_ids_beyond_the_context_are_a_400_before_decoding(http):
    error = assert_openai_error(
        http.post(COMPLETIONS, json={"prompt": [1] * 100_000, "echo": True}),
        400,
        "prompt",
        "context_length_exceeded",
    )
    assert "100000 token ids exceed max_model_len = 2048" in error["message"]


def test_a_long_prompt_being_tokenized_does_not_delay_a_small_request(server, http):
    def small() -> float:
        started = time.perf_counter()
        response = http.post(COMPLETIONS, json=SMALL)
        assert response.status_code == 200, response.text
        return time.perf_counter() - started

    alone = statistics.median(small() for _ in range(10))
    # Just under the character check, so each of the six is tokenized in full (seconds on CPU);
    # then the engine turns the first down as too long for the context.
    long_text = "hello world " * 27_000
    big: dict = {}

    def send_big() -> None:
        body = {"prompt": [long_text] * 6, "max_tokens": 1}
        started = time.perf_counter()
        big["response"] = httpx.post(f"{server.base_url}{COMPLETIONS}", json=body, timeout=300)
        big["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=send_big)
    thread.start()
    during = []
    while thread.is_alive():
        during.append(small())
    thread.join()
    assert_openai_error(big["response"], 400, "prompt", "context_length_exceeded")
    # Tokenizing on the event loop would hold the small request in flight until the long one is
    # done (one answer taking about as long as it). Off the loop they come at about their own pace.
    print(f"alone {alone:.3f} s; long prompt {big['seconds']:.2f} s; during: {sorted(during)}")
    assert len(during) >= 3, f"{len(during)} small requests answered while the long prompt was tokenized"
    assert statistics.median(during) < 10 * alone, (alone, sorted(during))
    assert max(during) < big["seconds"] / 3, (big["seconds"], sorted(during))


SURROGATE_CASES = [
    (COMPLETIONS, {"prompt": "a\ud800b"}, "prompt"),
    (COMPLETIONS, {"prompt": ["fine", "\udc00"]}, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "stop": "\ud800"}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["ok", "\ud800"]}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "model": "\ud800"}, "model"),
    (COMPLETIONS, {"prompt": "hi", "user": "\ud800"}, "user"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "\ud800"}, "suffix"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"\ud800": 1}}, "logit_bias"),
    (CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
        "messages.0.content",
    ),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages.0.name"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "stop": ["\udfff"]}, "stop"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "\ud800"}},
        "response_format.type",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATE_CASES)
def test_a_lone_surrogate_is_a_400_naming_the_field(api_server, path, body, param):
    body.setdefault("max_tokens", 2)
    raw = json.dumps(body)  # ASCII: the lone surrogate travels as the escape `\ud800`
    assert "\\ud" in raw or "\\udc" in raw or "\\udf" in raw
    response = httpx.post(
        f"{api_server.base_url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    error = assert_openai_error(response, 400, param, None)
    assert "lone UTF-16 surrogate" in error["message"]


def test_a_surrogate_pair_is_text_like_any_other(api_server):
    raw = json.dumps({"prompt": "smile \ud83d\ude00", "max_tokens": 2})  # one character, U+1F600
    response = httpx.post(
        f"{api_server.base_url}{COMPLETIONS}",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
