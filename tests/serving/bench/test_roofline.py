import pytest
import transformers
from kvpilot.serving.bench.roofline import (
    ModelShape,
    Peaks,
    kv_bytes_per_token,
    matmul_pass_shapes,
    measure_gemm_flops_per_s,
    measure_linears_flops_per_s,
    measure_memory_bytes_per_s,
    memory_test_bytes,
    request_flops,
    weight_bytes,
    workload_bound,
    workload_flops,
)

SHAPE = ModelShape(
    hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, vocab_size=10
)


def test_per_token_flops_of_a_known_config():
    # qkv 8x16, o 8x8, gate_up 8x32, down 16x8: 2 * (128 + 64 + 256 + 128) = 1152 per layer.
    assert SHAPE.layer_matmuls() == [(8, 16), (8, 8), (8, 32), (16, 8)]
    assert SHAPE.linear_flops_per_token() == 2 * 1152
    assert SHAPE.lm_head_flops_per_token() == 2 * 8 * 10
    assert SHAPE.attention_flops_per_context_token() == 4 * 2 * 4 * 2


def test_request_and_workload_flops():
    # prompt 3 + output 2: 4 forwarded tokens attending to 1+2+3+4 = 10 context tokens; lm_head twice.
    assert request_flops(SHAPE, 3, 2) == 4 * 2304 + 2 * 160 + 10 * 64
    assert request_flops(SHAPE, 1, 1) == 2304 + 160 + 64
    assert workload_flops(SHAPE, [(3, 2), (1, 1)]) == 10176 + 2528


def test_bound_is_the_slower_term_of_each_step():
    # SHAPE: weights 2 * (128 + 64 + 256 + 128) + 80 = 1232 values; K/V 2 layers x 2 x 4 = 16 per token.
    assert weight_bytes(SHAPE) == 4 * 1232 and kv_bytes_per_token(SHAPE) == 4 * 16
    lengths = [(3, 3), (1, 2)]
    # prefill: request_flops(3, 1) + request_flops(1, 1) = (3*2304 + 160 + 6*64) + (2304 + 160 + 64)
    prefill = 7456 + 2528
    # step 1: both decode, contexts 4 and 2; step 2: only the first, context 5.
    step_flops = [2 * 2464 + 64 * 6, 2464 + 64 * 5]
    step_bytes = [4928 + 64 * 6, 4928 + 64 * 5]

    compute_bound = workload_bound(SHAPE, lengths, Peaks(gemm_flops_per_s=1.0, memory_bytes_per_s=1e12))
    assert compute_bound.seconds == pytest.approx(prefill + sum(step_flops))
    assert compute_bound.seconds == pytest.approx(workload_flops(SHAPE, lengths))  # the same FLOPs
    assert (compute_bound.memory_bound_steps, compute_bound.decode_steps) == (0, 2)
    assert compute_bound.tokens_per_s == pytest.approx(5 / compute_bound.seconds)

    memory_bound = workload_bound(SHAPE, lengths, Peaks(gemm_flops_per_s=1e12, memory_bytes_per_s=1.0))
    assert memory_bound.memory_s == pytest.approx(sum(step_bytes))
    assert memory_bound.seconds == pytest.approx(prefill / 1e12 + sum(step_bytes))
    assert memory_bound.memory_bound_steps == 2

    # Mixed: step 1 memory-bound (5312 bytes > 5312 / 2 FLOP-s), step 2 compute-bound.
    mixed = workload_bound(SHAPE, lengths, Peaks(gemm_flops_per_s=1.0, memory_bytes_per_s=2.0))
    expected = prefill + sum(max(f, b / 2) for f, b in zip(step_flops, step_bytes, strict=True))
    assert mixed.seconds == pytest.approx(expected)
    assert mixed.seconds >= max(mixed.compute_s, mixed.memory_s)


def test_peaks_keep_the_best_of_two_measurements():
    assert Peaks(2.0, 5.0).best_of(Peaks(3.0, 4.0)) == Peaks(3.0, 5.0)


def test_bound_rejects_what_it_cannot_bound():
    with pytest.raises(ValueError, match="lengths"):
        workload_bound(SHAPE, [], Peaks(1.0, 1.0))
    with pytest.raises(ValueError, match="peaks"):
        workload_bound(SHAPE, [(1, 1)], Peaks(0.0, 1.0))


def test_shape_from_a_transformers_config():
    config = transformers.LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )
    shape = ModelShape.from_hf_config(config)
    assert shape == ModelShape(576, 1536, 30, 9, 3, 64, 49152)
    assert matmul_pass_shapes(shape)[-1] == (576, 49152, 1)
    # SmolLM2-135M: ~106M linear weights in the layers plus the 28M-weight lm_head.
    assert shape.linear_flops_per_token() == 2 * 30 * (576 * 960 + 576 * 576 + 576 * 3072 + 1536 * 576)


def test_gemm_peak_is_at_least_each_backend_alone():
    """The peak takes the best backend per shape: never below MKL's, oneDNN's or the panel
    kernel's own rate. (The old peak was MKL alone, which the engine's oneDNN linears beat.)"""
    import torch
    from kvpilot.kernels.packed_float import packed_float_weights

    shape = ModelShape(64, 128, 2, 4, 2, 16, 256)
    peak = measure_gemm_flops_per_s(shape, rows=(32,), min_time_s=0.05)
    weights = [torch.randn(n, k) for k, n, _ in matmul_pass_shapes(shape)]
    mkl = [lambda x, w=w: torch.mm(x, w.t()) for w in weights]
    packed = [[layout.linear for layout in packed_float_weights(w)] for w in weights]
    for linears in (mkl, *map(list, zip(*packed, strict=True))):
        alone = measure_linears_flops_per_s(shape, linears, batch=32, min_time_s=0.05)
        assert alone <= peak * 1.15, (alone, peak)  # timing noise only


def test_the_memory_test_outgrows_a_large_last_level_cache():
    assert memory_test_bytes(32 << 20) == 256 << 20  # Zen: 256 MiB is far larger than a 32 MiB L3
    assert memory_test_bytes(260 << 20) == 4 * (260 << 20)  # our Xeon guest's L3 would hold it
    assert memory_test_bytes(0) == 256 << 20  # no cache listed


def test_memory_bandwidth_is_measured():
    rate = measure_memory_bytes_per_s(num_bytes=8 << 20, min_time_s=0.02)
    assert 1e8 < rate < 1e13  # between a slow disk and any RAM that exists


def test_linears_must_match_the_shapes():
    with pytest.raises(ValueError, match="linears"):
        measure_linears_flops_per_s(SHAPE, [lambda x: x], batch=2, min_time_s=0.001)
