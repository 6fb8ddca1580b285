"""The native decode stack (serving/models/decode_stack.py) computes a decode step's layers in one
call, with the bits of the model's Python path, and leaves every other step to that path."""

import pytest
import torch
from kvpilot.kernels import cpu_extension, packed_float
from kvpilot.kernels.attention import build_attention_metadata
from kvpilot.kernels.quant import int8
from kvpilot.serving import LLM, SamplingParams

PROMPT_LENGTHS = (1, 7, 16, 17, 40)  # within, at and past a block of 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture
def panels(monkeypatch):
    """Panel-packed float weights, on any CPU with AVX2 + FMA (int8 panels: see `quantization`)."""
    if not cpu_extension.supports_packed_sgemm():
        pytest.skip("the panel GEMM needs AVX2 + FMA")
    monkeypatch.setenv(packed_float.GEMM_ENV, "panels")
    packed_float.float_gemm.cache_clear()
    yield
    packed_float.float_gemm.cache_clear()


@pytest.fixture(params=["none", "int8", "w8a8"])
def quantization(request) -> str:
    """The stack's weight formats: float32 panels, and int8 panels (weight-only or W8A8) where the
    int8 panel kernel runs (AVX-512 VNNI or AVX2)."""
    if request.param != "none" and not int8.use_int8_panels():
        pytest.skip("the int8 panel kernel needs AVX-512 VNNI or AVX2")
    return request.param


def _llm(checkpoint, kv_cache_dtype: str = "auto", quantization: str = "none") -> LLM:
    return LLM(
        model=str(checkpoint),
        num_kv_blocks=64,
        enable_prefix_caching=False,
        kv_cache_dtype=kv_cache_dtype,
        quantization=quantization,
    )


def _cache_tensors(kv_caches) -> list[torch.Tensor]:
    """Copies of every cache's values (and an int8 cache's scales)."""
    caches = [cache for pair in kv_caches for cache in pair]
    tensors = [getattr(cache, "data", cache) for cache in caches]
    tensors += [cache.scales for cache in caches if getattr(cache, "scales", None) is not None]
    return [tensor.clone() for tensor in tensors]


def _prompts() -> list[list[int]]:
    return [[(7 * n + i) % 1000 + 3 for i in range(n)] for n in PROMPT_LENGTHS]


def _capture_decode_step(llm: LLM):
    """Runs the prompts until every sequence decodes; returns one pure decode step's forward inputs."""
    engine, model = llm.llm_engine, llm.llm_engine.model_runner.model
    for i, prompt in enumerate(_prompts()):
        engine.add_request(str(i), prompt, GREEDY)
    captured = []
    forward = model.forward

    def recording_forward(ids, metadata, caches):
        captured.append((ids.clone(), metadata))
        return forward(ids, metadata, caches)

    model.forward = recording_forward
    try:
        while not any(metadata.max_query_len == 1 for _, metadata in captured):
            engine.step()
    finally:
        model.forward = forward
    return next((ids, metadata) for ids, metadata in captured if metadata.max_query_len == 1)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_decode_step_matches_the_python_path_bit_for_bit(
    panels, tiny_llama, threads, kv_cache_dtype, quantization
):
    llm = _llm(tiny_llama, kv_cache_dtype, quantization)
    model, runner = llm.llm_engine.model_runner.model, llm.llm_engine.model_runner
    assert model.decode_stack is not None
    generator = torch.Generator().manual_seed(0)
    for layer in model.layers:  # a random checkpoint's norms are all ones: make each one count
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
    ids, metadata = _capture_decode_step(llm)
    assert metadata.num_seqs == len(PROMPT_LENGTHS)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for stack in (model.decode_stack, None):  # both write the same K/V to the same slots
            model.decode_stack = stack
            hidden = model.forward(ids, metadata, runner.kv_caches)
            results.append((hidden, _cache_tensors(runner.kv_caches)))
    finally:
        torch.set_num_threads(previous)
    (native, native_caches), (python, python_caches) = results
    assert torch.equal(native, python)
    assert all(torch.equal(a, b) for a, b in zip(native_caches, python_caches, strict=True))


def test_generation_is_the_same_with_and_without_the_stack(panels, tiny_llama, quantization):
    """And the engine's decode steps do go through the stack."""
    with_stack = _llm(tiny_llama, quantization=quantization)
    model = with_stack.llm_engine.model_runner.model
    stack, ran = model.decode_stack, []

    def counted(x, metadata, kv_caches):
        hidden = stack(x, metadata, kv_caches)
        ran.append(hidden is not None)
        return hidden

    model.decode_stack = counted
    without = _llm(tiny_llama, quantization=quantization)
    without.llm_engine.model_runner.model.decode_stack = None
    outputs = [
        [list(out.outputs[0].token_ids) for out in llm.generate(_prompts(), GREEDY)]
        for llm in (with_stack, without)
    ]
    assert outputs[0] == outputs[1]
    assert all(len(tokens) == GREEDY.max_tokens for tokens in outputs[0])
    assert ran.count(True) >= GREEDY.max_tokens - 1  # every decode step (prefill steps: False)


@pytest.mark.parametrize(
    "arch, runs_natively",
    [("llama", True), ("mistral", True), ("qwen2", False), ("qwen3", False)],  # q/k/v biases, q/k norms
)
def test_the_stack_takes_only_models_it_computes_exactly(panels, tiny_checkpoints, arch, runs_natively):
    model = _llm(tiny_checkpoints[arch]).llm_engine.model_runner.model
    assert (model.decode_stack is not None) == runs_natively


def test_prefill_steps_and_fp8_caches_are_left_to_the_python_path(panels, tiny_llama):
    llm = _llm(tiny_llama)
    runner = llm.llm_engine.model_runner
    stack = runner.model.decode_stack
    prefill = build_attention_metadata([3], [0], [[1]], block_size=16)
    x = torch.randn(3, 64)
    before = x.clone()
    assert stack(x, prefill, runner.kv_caches) is None
    assert torch.equal(x, before)  # nothing written
    fp8 = _llm(tiny_llama, "fp8").llm_engine.model_runner
    decode = build_attention_metadata([1], [4], [[1]], block_size=16)
    assert stack(torch.randn(1, 64), decode, fp8.kv_caches) is None


def test_a_position_past_the_rotary_tables_is_an_index_error(panels, tiny_llama):
    runner = _llm(tiny_llama).llm_engine.model_runner
    stack = runner.model.decode_stack
    rows = stack.rotary_tables[0].shape[0]
    block_size = runner.kv_caches[0][0].shape[1]
    table = [1] * (rows // block_size + 1)
    metadata = build_attention_metadata([1], [rows], [table], block_size=block_size)
    with pytest.raises(IndexError, match="positions"):
        stack(torch.randn(1, 64), metadata, runner.kv_caches)
