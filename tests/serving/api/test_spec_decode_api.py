"""A server with n-gram speculative decoding: the same text as the plain server (stop strings
included) and vLLM's spec-decode counters in /metrics."""

import openai
import pytest

from tests.serving.api.conftest import ServerThread, scrape, tiny_settings

# Two strongly biased tokens: the output mixes them, so n-grams repeat and drafts are partly right.
BIASED = {"temperature": 0, "max_tokens": 24, "frequency_penalty": 0.3}
EXTRA = {"ignore_eos": True}
LOGIT_BIAS = {"101": 30, "202": 30}


@pytest.fixture(scope="module")
def spec_server(tiny_llama):
    server = ServerThread(tiny_settings(tiny_llama, speculative_ngram=2, num_speculative_tokens=3)).start()
    yield server
    server.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def complete(server, **kwargs):
    return client(server).completions.create(
        model="tiny-llama",
        prompt="Once upon a time",
        logit_bias=LOGIT_BIAS,
        extra_body=EXTRA,
        **BIASED,
        **kwargs,
    )


def test_speculative_server_matches_the_plain_one_and_counts_drafts(api_server, spec_server):
    before = scrape(spec_server.base_url)
    plain = complete(api_server).choices[0]
    spec = complete(spec_server).choices[0]
    assert (spec.text, spec.finish_reason) == (plain.text, "length")
    after = scrape(spec_server.base_url)
    drafts = (
        after["vllm:spec_decode_num_draft_tokens_total"] - before["vllm:spec_decode_num_draft_tokens_total"]
    )
    accepted = (
        after["vllm:spec_decode_num_accepted_tokens_total"]
        - before["vllm:spec_decode_num_accepted_tokens_total"]
    )
    assert 0 < accepted < drafts
    # A stop string in the middle of the text: both cut at the same place.
    stop = plain.text[len(plain.text) // 2 :][:3]
    cut_plain = complete(api_server, stop=[stop]).choices[0]
    cut_spec = complete(spec_server, stop=[stop]).choices[0]
    assert (cut_spec.text, cut_spec.finish_reason) == (cut_plain.text, "stop")
    assert len(cut_spec.text) < len(plain.text)
    streamed = "".join(
        c.choices[0].text for c in complete(spec_server, stream=True, stop=[stop]) if c.choices
    )
    assert streamed == cut_plain.text
