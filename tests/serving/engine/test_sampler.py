"""Sampler on hand-made logits: exclusion rules, seeded determinism, penalties, logprobs."""

import math

import pytest
import torch
from kvpilot.serving.engine.request import Request
from kvpilot.serving.engine.sampler import Sampler, argmax_rows
from kvpilot.serving.sampling_params import MAX_SEED, MIN_SEED, SamplingParams
from kvpilot.serving.validation import InvalidParameter

VOCAB = 12
EOS = 11


def make_request(params: SamplingParams, seed: int | None = None, prompt=(0, 1), output=()) -> Request:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    request = Request("r", list(prompt), params, max_tokens=100, generator=generator)
    request.output_token_ids = list(output)
    return request


def make_sampler(seed: int = 0) -> Sampler:
    return Sampler({EOS}, torch.Generator().manual_seed(seed))


def fixed_logits() -> torch.Tensor:
    # Distinct, moderately spread logits so that every kept token has visible probability.
    return torch.tensor([2.0, 1.6, 1.3, 1.1, 0.9, 0.5, 0.2, 0.0, -0.3, -0.7, -1.0, -1.5])


def allowed_tokens(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """The definitions, written out one token at a time."""
    probs = torch.softmax(logits / temperature, dim=-1).tolist()
    allowed = set(range(len(probs)))
    if min_p > 0:
        allowed = {i for i in allowed if probs[i] >= min_p * max(probs)}
    ranked = sorted(allowed, key=lambda i: -probs[i])
    if top_k > 0:
        ranked = ranked[:top_k]
    if top_p < 1.0:
        total = sum(probs[i] for i in ranked)
        kept, mass = [], 0.0
        for i in ranked:
            kept.append(i)
            mass += probs[i] / total
            if mass >= top_p:
                break
        ranked = kept
    return set(ranked)


def draw(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, num: int) -> list[int]:
    requests = [make_request(params) for _ in range(num)]
    return sampler(logits.repeat(num, 1), requests).token_ids


@pytest.mark.parametrize(
    "settings",
    [
        dict(top_k=3),
        dict(top_p=0.6),
        dict(min_p=0.3),
        dict(top_k=5, top_p=0.7, temperature=0.7),
        dict(min_p=0.2, top_p=0.9, temperature=1.5),
    ],
)
def test_filters_never_emit_excluded_tokens_and_reach_every_allowed_one(settings):
    logits = fixed_logits()
    allowed = allowed_tokens(logits, **settings)
    assert 1 < len(allowed) < VOCAB  # the case really excludes something
    tokens = draw(make_sampler(), logits, SamplingParams(**settings), 3000)
    assert set(tokens) == allowed
    # Frequencies follow the renormalized distribution over the allowed tokens.
    probs = torch.softmax(logits / settings.get("temperature", 1.0), dim=-1)
    total = sum(float(probs[i]) for i in allowed)
    for token in allowed:
        expected = float(probs[token]) / total
        observed = tokens.count(token) / len(tokens)
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / len(tokens)) + 1e-3


def test_greedy_rows_take_the_argmax_next_to_random_rows():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    greedy, random = SamplingParams(temperature=0), SamplingParams()
    params = [greedy, random, greedy, random]
    out = make_sampler()(logits, [make_request(p) for p in params])
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(logits[2].argmax())


@pytest.mark.parametrize("temperature", [1e-38, 1e-300])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature):
    """logits / 1e-38 overflows float32 (NaN probabilities, token 0 every time): such rows take
    the argmax, beside a random row as in any batch."""
    logits = 10 * torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))  # a model's range
    expected = argmax_rows(logits).tolist()
    assert 0 not in expected  # the overflow's token 0 would not pass for the argmax
    tiny, random = SamplingParams(temperature=temperature), SamplingParams()
    out = make_sampler()(logits, [make_request(p) for p in (tiny, random, tiny)])
    assert [out.token_ids[0], out.token_ids[2]] == [expected[0], expected[2]]


def test_a_seed_is_what_a_torch_generator_takes_for_every_sequence():
    """Sequence i is seeded with seed + i; torch takes [-2**63, 2**64)."""
    for params in (SamplingParams(seed=MIN_SEED), SamplingParams(n=3, seed=MAX_SEED - 2)):
        for index in range(params.n):
            torch.Generator().manual_seed(params.seed + index)
    for seed, n in ((MIN_SEED - 1, 1), (MAX_SEED + 1, 1), (MAX_SEED - 1, 3)):
        with pytest.raises(InvalidParameter) as raised:
            SamplingParams(n=n, seed=seed)
        assert raised.value.param == "seed"


def test_seeded_request_is_independent_of_the_batch_around_it():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0)

    def run(batch_of: int, row: int, sampler_seed: int) -> list[int]:
        sampler = make_sampler(sampler_seed)
        seeded = make_request(params, seed=1234)
        tokens = []
        for _ in range(20):
            requests = [make_request(params, seed=i if i % 2 else None) for i in range(batch_of)]
            requests.insert(row, seeded)
            batch = logits.repeat(len(requests), 1) + 0.0
            tokens.append(sampler(batch, requests).token_ids[row])
        return tokens

    alone = run(0, 0, sampler_seed=0)
    assert len(set(alone)) > 1  # really random
    assert run(5, 3, sampler_seed=7) == alone
    assert run(2, 2, sampler_seed=99) == alone
    # Another seed gives another sequence.
    other = make_request(params, seed=4321)
    sampler = make_sampler()
    assert [sampler(logits[None], [other]).token_ids[0] for _ in range(20)] != alone


def test_penalties_follow_vllm_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0] + [0.0] * (VOCAB - 6)])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # prompt has token 0 and 1; output has token 3 twice and token 4 once.
    request = make_request(params, prompt=(0, 1), output=(3, 3, 4))
    processed = make_sampler().process_logits(logits, [request])[0]
    expected = logits[0].clone()
    expected[0] = 2.0 / 2  # repetition: positive divided
    expected[1] = -1.0 * 2  # repetition: negative multiplied
    expected[3] = 3.0 / 2 - 0.5 - 0.25 * 2  # repetition, then presence, then frequency x count
    expected[4] = -2.0 * 2 - 0.5 - 0.25 * 1
    assert torch.allclose(processed, expected)
    assert torch.equal(logits[0, 0], torch.tensor(2.0))  # the caller's logits are untouched


def test_logit_bias_and_min_tokens_mask():
    logits = torch.zeros(2, VOCAB)
    logits[:, EOS] = 5.0
    logits[:, 7] = 4.0
    biased = make_request(SamplingParams(temperature=0, logit_bias={3: 10.0}))
    min_tokens = make_request(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(7,)), output=(5,))
    assert make_sampler()(logits, [biased, min_tokens]).token_ids == [3, 0]
    done = make_request(SamplingParams(temperature=0, min_tokens=2), output=(5, 6))  # min_tokens reached
    assert make_sampler()(logits[:1], [done]).token_ids == [EOS]


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(5))
    # Penalties and temperature change the sampling distribution, not the reported logprobs.
    params = [
        SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.5),
        SamplingParams(temperature=0, logprobs=0),
    ]
    out = make_sampler()(logits, [make_request(p, seed=1) for p in params])
    reference = torch.log_softmax(logits, dim=-1)
    first, second = out.logprobs
    top3 = reference[0].topk(3).indices.tolist()
    assert set(first) == {out.token_ids[0], *top3}
    for token, value in first.items():
        assert value == pytest.approx(float(reference[0, token]), abs=1e-6)
    assert second == {out.token_ids[1]: pytest.approx(float(reference[1].max()), abs=1e-6)}


def test_no_logprobs_unless_asked():
    out = make_sampler()(torch.zeros(1, VOCAB), [make_request(SamplingParams(temperature=0))])
    assert out.logprobs == [None]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "row, expected",
    [
        ([0.5, 2.0, -1.0, 2.0], 1),  # equal maxima: the first one
        ([1.0, NAN, 3.0, NAN], 1),  # NaN counts as the largest: the first NaN
        ([-INF, -INF, -INF], 0),  # all -inf (e.g. every token masked): the first
        ([-INF, INF, 1.0], 1),
        ([1.0] * 40 + [1.5] + [1.5] * 40, 40),  # past one vector's width
    ],
)
def test_argmax_rows_picks_what_argmax_picks(row, expected):
    logits = torch.tensor([row, row[::-1]])
    assert argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert argmax_rows(logits)[0].item() == expected
