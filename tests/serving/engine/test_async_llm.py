"""AsyncLLM on the tiny Llama: streams, abort, cancellation, errors, idle loop."""

import asyncio
import itertools
import os
import time
from pathlib import Path

import pytest
from kvpilot.serving.engine.async_llm import AsyncLLM, EngineDeadError
from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    engine = AsyncLLM(EngineConfig(model=str(tiny_llama), block_size=4, num_kv_blocks=256))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.shutdown())


def assert_all_blocks_free(engine: AsyncLLM) -> None:
    pool = engine.engine.scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks and all(b.ref_cnt == 0 for b in pool.blocks)


async def wait_until_idle(engine: AsyncLLM, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.num_running or engine.num_waiting:
        assert time.monotonic() < deadline, "the engine did not drop the request"
        await asyncio.sleep(0.01)


async def collect(engine: AsyncLLM, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


async def test_streams_are_cumulative_and_concurrent_streams_match_single_runs(engine):
    prompts = [[10, 11, 12], [20, 21, 22, 23, 24, 25], [30] * 9]
    alone = [await collect(engine, p, GREEDY, f"alone-{i}") for i, p in enumerate(prompts)]
    streams = [collect(engine, p, GREEDY, f"together-{i}") for i, p in enumerate(prompts)]
    together = await asyncio.gather(*streams)
    for stream in alone:
        assert [len(out.outputs[0].token_ids) for out in stream] == [1, 2, 3, 4, 5, 6]
        assert [out.finished for out in stream] == [False] * 5 + [True]
        for before, after in itertools.pairwise(stream):
            earlier = before.outputs[0].token_ids
            assert after.outputs[0].token_ids[: len(earlier)] == earlier
    assert [s[-1].outputs[0].token_ids for s in together] == [s[-1].outputs[0].token_ids for s in alone]
    assert together[0][-1].request_id == "together-0"
    assert_all_blocks_free(engine)


async def test_abort_frees_the_blocks_and_ends_the_stream(engine):
    stream = engine.generate([5] * 30, LONG, "to-abort")
    first = await stream.__anext__()
    assert not first.finished and engine.get_stats().kv_cache_usage > 0
    await engine.abort("to-abort")
    assert_all_blocks_free(engine)  # at once, not eventually
    rest = [out async for out in stream]
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert len(rest[-1].outputs[0].token_ids) < 400
    await engine.abort("no-such-request")  # ignored


async def test_a_cancelled_consumer_aborts_its_request(engine):
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate([6] * 20, LONG, "cancelled"):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_idle(engine)
    assert_all_blocks_free(engine)


async def test_breaking_out_of_the_stream_aborts_its_request(engine):
    stream = engine.generate([7] * 20, LONG, "abandoned")
    async for _ in stream:
        break
    await stream.aclose()
    await wait_until_idle(engine)
    assert_all_blocks_free(engine)


def test_a_consumer_whose_event_loop_is_gone_does_not_hurt_the_engine(engine):
    async def take_one_and_leave():
        stream = engine.generate([8] * 20, LONG, "orphan")
        await stream.__anext__()
        await stream.aclose()  # the loop closes right after; the abort is processed later

    asyncio.run(take_one_and_leave())

    async def next_request():
        outputs = await collect(engine, [9, 9, 9], GREEDY, "after-orphan")
        await wait_until_idle(engine)
        return outputs

    outputs = asyncio.run(asyncio.wait_for(next_request(), timeout=30))
    assert outputs[-1].finished and engine.is_running
    assert_all_blocks_free(engine)


async def test_bad_requests_fail_fast(engine):
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        await collect(engine, [], GREEDY, "empty")
    stream = engine.generate([1] * 10, LONG, "dup")
    await stream.__anext__()
    with pytest.raises(ValueError, match="request_id: 'dup' is already in the engine"):
        await collect(engine, [1, 2], GREEDY, "dup")
    await stream.aclose()
    await wait_until_idle(engine)


def test_the_idle_loop_sleeps(engine):
    thread = engine._thread
    stat = f"/proc/self/task/{thread.native_id}/stat"
    if not os.path.exists(stat):
        pytest.skip("needs Linux /proc")

    def cpu_ticks() -> int:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu_ticks()
    time.sleep(0.5)
    assert cpu_ticks() - before <= 2  # a busy loop would burn ~50 ticks


async def test_an_engine_error_reaches_every_stream(tiny_llama):
    broken = AsyncLLM(EngineConfig(model=str(tiny_llama), block_size=4, num_kv_blocks=256))
    calls = 0
    real_execute = broken.engine.model_runner.execute_model

    def fail_on_the_third_step(scheduler_output):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected fault")
        return real_execute(scheduler_output)

    broken.engine.model_runner.execute_model = fail_on_the_third_step
    await broken.start()
    streams = [collect(broken, [i + 1] * 5, LONG, f"victim-{i}") for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), timeout=30)
    assert all(isinstance(r, EngineDeadError) and "injected fault" in str(r) for r in results), results
    assert not broken.is_running
    with pytest.raises(EngineDeadError):
        await collect(broken, [1, 2], GREEDY, "after")
    await broken.shutdown()


async def test_a_request_that_outlives_the_loop_while_its_grammar_compiles_hears_it_died(tiny_llama):
    """The grammar compile runs before the stream is registered (seconds, off the loop): a step
    loop dying meanwhile failed the streams it knew, and this one then waited forever."""
    from kvpilot.serving.structured_outputs import StructuredOutputsParams

    broken = AsyncLLM(EngineConfig(model=str(tiny_llama), block_size=4, num_kv_blocks=256))
    await broken.start()
    compiling, compile_grammar = asyncio.Event(), broken.engine.compile_grammar
    loop = asyncio.get_running_loop()

    def slow_compile(params):
        loop.call_soon_threadsafe(compiling.set)
        time.sleep(1.0)  # a large JSON Schema
        return compile_grammar(params)

    def broken_step():
        raise RuntimeError("injected fault")

    broken.engine.compile_grammar, broken.engine.step = slow_compile, broken_step
    choice = SamplingParams(
        temperature=0, max_tokens=5, structured_outputs=StructuredOutputsParams(choice=["a", "b"])
    )
    waiting = asyncio.create_task(collect(broken, [5, 6, 7], choice, "compiling"))
    await compiling.wait()
    with pytest.raises(EngineDeadError):  # this request's step kills the loop
        await collect(broken, [5, 6], GREEDY, "killer")
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(waiting, timeout=10)
    await broken.shutdown()
