import pytest
import transformers
from kvpilot.serving.bench.roofline import (
    ModelShape,
    matmul_pass_shapes,
    measure_mm_flops_per_s,
    request_flops,
    roofline_tokens_per_s,
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


def test_roofline_tokens_per_s():
    assert roofline_tokens_per_s(10176, 2, 10176.0) == pytest.approx(2.0)
    assert roofline_tokens_per_s(1_000_000, 50, 2e6) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        roofline_tokens_per_s(0, 1, 1.0)


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


def test_measured_matmul_throughput_is_positive():
    assert measure_mm_flops_per_s(SHAPE, batch=4, min_time_s=0.001) > 0
