"""`kvpilot serve --inject-error-rate` (a test aid): a real server on the tiny checkpoint fails an
evenly spread share of completion requests with HTTP 500 and an OpenAI error body, before the
engine generates anything; the other endpoints are untouched."""

import httpx
import openai
import pytest
from kvpilot.serving import cli
from kvpilot.serving.api.settings import ServeSettings
from pydantic import ValidationError

from tests.serving.api.conftest import ServerThread, scrape, tiny_settings


@pytest.fixture(scope="module")
def failing_server(tiny_llama):
    server = ServerThread(tiny_settings(tiny_llama, inject_error_rate=0.25)).start()
    yield server
    server.stop()


def test_every_fourth_completion_fails_with_500_before_any_token(failing_server):
    client = openai.OpenAI(base_url=f"{failing_server.base_url}/v1", api_key="none", max_retries=0)
    outcomes = []
    for i in range(8):
        try:
            if i % 2:
                client.chat.completions.create(
                    model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
                )
            else:
                client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=2, stream=i == 4)
            outcomes.append("ok")
        except openai.InternalServerError as exc:
            assert exc.body["code"] == "injected_error" and exc.body["type"] == "server_error"
            assert "--inject-error-rate 0.25, a test aid" in exc.body["message"]
            outcomes.append("500")
    assert outcomes == ["ok", "ok", "ok", "500"] * 2
    # Only the six answered requests reached the engine.
    finished = {
        k: v
        for k, v in scrape(failing_server.base_url).items()
        if k.startswith("vllm:request_success_total{")
    }
    assert sum(finished.values()) == 6
    assert httpx.get(f"{failing_server.base_url}/v1/models").status_code == 200
    assert httpx.get(f"{failing_server.base_url}/ready").status_code == 200


def test_the_flag_is_a_documented_fraction(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "--inject-error-rate FRACTION" in capsys.readouterr().out.replace("\n", " ")
    assert ServeSettings().inject_error_rate == 0
    with pytest.raises(ValidationError, match="must be a fraction between 0 and 1"):
        ServeSettings(inject_error_rate=1.5)
