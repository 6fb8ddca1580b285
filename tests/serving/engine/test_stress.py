"""100 requests of random shape with random aborts through a small KV pool on the tiny Llama."""

import random

import pytest
from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.engine.llm_engine import LLMEngine
from kvpilot.serving.sampling_params import SamplingParams

NUM_REQUESTS = 100


def random_params(rng: random.Random) -> SamplingParams:
    kind = rng.choice(["greedy", "greedy", "seeded", "random", "n2"])
    common = dict(max_tokens=rng.randint(1, 24), min_tokens=rng.choice([0, 0, 1]))
    if rng.random() < 0.3:
        common["stop_token_ids"] = tuple(rng.sample(range(49152), 2000))  # often hit
    if kind == "greedy":
        return SamplingParams(temperature=0, **common)
    if kind == "seeded":
        return SamplingParams(temperature=0.9, top_k=50, seed=rng.randint(0, 10**6), **common)
    if kind == "random":
        return SamplingParams(temperature=1.2, top_p=0.9, **common)
    return SamplingParams(n=2, temperature=1.0, seed=rng.randint(0, 10**6), **common)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    config = EngineConfig(
        model=str(tiny_llama), block_size=4, num_kv_blocks=40, max_num_seqs=16, max_num_batched_tokens=48
    )
    return LLMEngine(config)


def test_random_requests_and_aborts_leave_every_block_free(engine):
    rng = random.Random(1234)
    requests = {}
    for i in range(NUM_REQUESTS):
        prompt = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 80))]
        # Every third request shares a prefix, so prefix hits and evictions happen too.
        if i % 3 == 0:
            prompt = list(range(100, 120)) + prompt[:40]
        requests[f"req-{i}"] = (prompt, random_params(rng))

    pending = list(requests)
    final = {}
    aborted = set()
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 4)):  # requests arrive over time
            if pending:
                request_id = pending.pop(0)
                engine.add_request(request_id, *requests[request_id])
        if rng.random() < 0.15:  # abort a random live request (waiting, running or preempted)
            live = sorted(set(requests) - set(pending) - set(final))
            if live:
                victim = rng.choice(live)
                aborted.add(victim)
                for output in engine.abort_request(victim):
                    final[output.request_id] = output
        for output in engine.step():
            assert output.request_id not in final, "output after the request finished"
            if output.finished:
                final[output.request_id] = output
        steps += 1
        assert steps < 5000, "no progress"

    # No request is lost, and each ended the way its parameters say.
    assert set(final) == set(requests)
    for request_id, output in final.items():
        prompt, params = requests[request_id]
        assert output.prompt_token_ids == prompt and len(output.outputs) == params.n
        for completion in output.outputs:
            tokens = completion.token_ids
            if completion.finish_reason == "abort":
                assert request_id in aborted
            elif completion.finish_reason == "length":
                assert len(tokens) == params.max_tokens
            else:
                assert completion.finish_reason == "stop" and len(tokens) >= params.min_tokens
                assert tokens[-1] in engine.eos_token_ids | set(params.stop_token_ids)
                assert not set(tokens[: max(params.min_tokens - 1, 0)]) & set(params.stop_token_ids)

    stats = engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0  # the pool was really under pressure
    assert len(aborted) > 5 and stats.num_running == stats.num_waiting == 0

    pool = engine.scheduler.kv_cache_manager.block_pool
    assert all(block.ref_cnt == 0 for block in pool.blocks)
    assert sorted(pool.free_queue.block_ids()) == list(range(pool.num_blocks))
    assert engine.scheduler.kv_cache_manager.req_to_blocks == {}

    # Greedy results under preemption and prefix caching equal the same requests run alone.
    greedy = [
        rid
        for rid, out in final.items()
        if requests[rid][1].temperature == 0 and out.outputs[0].finish_reason != "abort"
    ]
    for request_id in greedy[:6]:
        prompt, params = requests[request_id]
        engine.add_request(f"again-{request_id}", prompt, params)
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        assert outputs[-1].outputs[0].token_ids == final[request_id].outputs[0].token_ids
