"""Quantized weight formats: error bounds, fast CPU path vs the dequantize reference, memory."""

import pytest
import torch
from kvpilot.kernels.quant import Fp8Weight, Int4Weight, Int8Weight, quantize

CASES = [
    ("int8", None),
    ("int8", 32),
    ("w8a8", None),
    ("int4", 32),
    ("int4", 64),
    ("int4", 128),
    ("fp8", None),
]


def _weight(out: int = 96, in_features: int = 192, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, in_features, generator=generator) * 0.05


def _activations(*shape: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 40  # an outlier channel, as real hidden states have
    return x


@pytest.mark.parametrize(("mode", "group_size"), CASES)
def test_quantization_error_is_within_half_a_step(mode, group_size):
    w = _weight()
    q = quantize(w, mode, group_size)
    error = (q.dequantize() - w).abs()
    if mode in ("int8", "w8a8"):
        step = q.scales.repeat_interleave(q.group_size, dim=1)
        assert (error <= step / 2 + 1e-7).all()
    elif mode == "int4":
        step = q.scales.float().repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
        assert (error <= step / 2 + 2e-3 * w.abs().max()).all()  # + float16 rounding of scale/min
    else:  # e4m3: 3 mantissa bits, so half a step is at most 2^-4 of the value (or of the subnormal step)
        assert (error <= w.abs() / 16 + q.scales[:, None] * 2**-10 + 1e-7).all()
    assert q.shape == tuple(w.shape)


@pytest.mark.parametrize(("mode", "group_size"), CASES)
@pytest.mark.parametrize("tokens", [1, 33])
def test_fast_linear_matches_dequantize_reference(mode, group_size, tokens):
    q = quantize(_weight(), mode, group_size)
    x = _activations(tokens, 192)
    reference = (_per_token_int8(x) if mode == "w8a8" else x) @ q.dequantize().t()
    fast = q.linear(x)
    assert fast.shape == reference.shape and fast.dtype == torch.float32
    relative = (fast - reference).norm() / reference.norm()
    assert relative < (2e-3 if mode == "int8" and group_size is None else 1e-5)  # int7 halves: ~1e-4


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """The W8A8 definition: each token rounded to 255 levels of its own max |value| / 127."""
    unit = x.abs().amax(-1, keepdim=True) / 127
    return (x / unit).round() * unit


def test_per_token_activation_quantization_error_is_bounded():
    q = quantize(_weight(), "w8a8")
    x = torch.randn(64, 192, generator=torch.Generator().manual_seed(2))
    exact = x @ q.dequantize().t()
    assert (q.linear(x) - exact).norm() / exact.norm() < 1e-2


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_per_channel_int8_is_packed_and_independent_of_the_batch(mode):
    q = quantize(_weight(), mode)
    assert q.packed is not None and q.stored is None  # the packed weight is the only copy
    x = _activations(9, 192)
    alone = torch.cat([q.linear(x[i : i + 1]) for i in range(9)])
    assert torch.equal(q.linear(x), alone)


def test_linear_accepts_leading_dimensions():
    q = quantize(_weight(), "int4", 32)
    x = _activations(2, 3, 192)
    assert torch.allclose(q.linear(x), x @ q.dequantize().t(), atol=1e-5)


@pytest.mark.parametrize(("mode", "group_size"), CASES)
def test_embed_and_select_rows_match_dequantized_rows(mode, group_size):
    q = quantize(_weight(), mode, group_size)
    full = q.dequantize()
    ids = torch.tensor([[5, 0], [95, 5]])
    assert torch.equal(q.embed(ids), full[ids])
    index = torch.tensor([3, 1, 2])
    assert torch.equal(q.select_rows(index).dequantize(), full[index])


def test_int4_with_a_partial_last_group():
    w = _weight(8, 80)  # 80 columns = one group of 64 + 16 padded columns
    q = quantize(w, "int4", 64)
    assert q.qweight.shape == (8, 64) and q.scales.shape == (8, 2)
    assert q.dequantize().shape == (8, 80)
    x = _activations(4, 80)
    assert torch.allclose(q.linear(x), x @ q.dequantize().t(), atol=1e-5)
    assert (q.dequantize() - w).abs().max() <= q.scales.float().max() / 2 + 1e-3


def test_memory_is_the_quantized_size():
    out, in_features = 96, 192
    w = _weight(out, in_features)
    int4 = quantize(w, "int4", 32)
    assert isinstance(int4, Int4Weight)
    assert (
        int4.nbytes == out * in_features // 2 + 2 * (out * in_features // 32) * 2
    )  # nibbles + f16 scale/min
    assert quantize(w, "int8").nbytes == out * in_features + out * 4
    fp8 = quantize(w, "fp8")
    assert isinstance(fp8, Fp8Weight) and fp8.weight.dtype == torch.float8_e4m3fn
    assert fp8.nbytes == out * in_features + out * 4
    assert w.numel() * 4 / int4.nbytes > 6


def test_bad_input_names_the_field():
    w = _weight()
    with pytest.raises(ValueError, match="quantization"):
        quantize(w, "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize(w, "int4", 48)
    with pytest.raises(ValueError, match="group_size"):
        quantize(w, "int8", 50)
    with pytest.raises(ValueError, match="weight"):
        quantize(w[0], "int8")
    with pytest.raises(ValueError, match="qweight"):
        Int8Weight.from_int8(torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 1))


@pytest.mark.parametrize(("mode", "group_size"), CASES)
def test_to_device_keeps_the_values(mode, group_size):
    q = quantize(_weight(), mode, group_size)
    moved = q.to("cpu")
    assert type(moved) is type(q) and torch.equal(moved.dequantize(), q.dequantize())


@pytest.mark.parametrize(("mode", "group_size"), CASES)
def test_concat_rows_stacks_output_channels(mode, group_size):
    parts = [quantize(_weight(out, seed=out), mode, group_size) for out in (64, 32, 32)]
    merged = type(parts[0]).concat_rows(parts)
    assert merged.shape == (128, 192)
    assert torch.equal(merged.dequantize(), torch.cat([part.dequantize() for part in parts]))
    x = _activations(5, 192)
    assert torch.allclose(merged.linear(x), torch.cat([part.linear(x) for part in parts], dim=1), atol=1e-5)


def test_concat_rows_refuses_different_layouts():
    w = _weight()
    assert Int8Weight.concat_rows([quantize(w, "int8"), quantize(w, "int8", 32)]) is None
    assert Int8Weight.concat_rows([quantize(w, "int8"), quantize(w, "w8a8")]) is None
    assert Int4Weight.concat_rows([quantize(w, "int4", 32), quantize(w, "int4", 64)]) is None
