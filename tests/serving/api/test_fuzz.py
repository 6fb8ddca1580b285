"""The whole HTTP API fuzzed from its own OpenAPI schema (schemathesis: valid and invalid bodies,
every operation) against a real `kvpilot serve` process: never a 5xx, every 4xx OpenAI's error
body, and the server keeps serving afterwards."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.serving.api.conftest import ServeProcess

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def fuzzed_server(tiny_llama, tmp_path_factory):
    # A short context bounds the work of any one fuzzed request (max_tokens, n, prompt length).
    args = ["--model", str(tiny_llama), "--num-kv-blocks", "256", "--max-model-len", "64"]
    process = ServeProcess([*args, "--no-access-log"], tmp_path_factory.mktemp("fuzz") / "server.log").start()
    yield process
    assert process.stop() == 0, process.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(f"{fuzzed_server.base_url}/openapi.json")


def openai_error_body(ctx, response, case) -> None:
    """Every 4xx carries `{"error": {"message", "type", "param", "code"}}` with a message."""
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_never_answers_5xx_and_every_4xx_is_an_openai_error(api_schema, mode):
    # Hypothesis drives schemathesis's strategies directly: its pytest plugin does not load under
    # this pytest. One run per operation; bounded examples keep it to seconds.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    if mode == GenerationMode.NEGATIVE:  # only a request body can be invalid here (no parameters)
        operations = [op for op in operations if len(op.body)]
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,  # the same examples every run: a failure reproduces
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case) -> None:
            case.call_and_validate(checks=[not_a_server_error, openai_error_body], timeout=60)

        call()


def test_the_server_keeps_serving_after_the_fuzzing(fuzzed_server):
    assert fuzzed_server.process.poll() is None
    assert httpx.get(f"{fuzzed_server.base_url}/ready", timeout=10).status_code == 200
    body = {"prompt": "still here", "max_tokens": 3}
    response = httpx.post(f"{fuzzed_server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
