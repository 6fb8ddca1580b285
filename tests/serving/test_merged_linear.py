"""q/k/v and gate/up run as one matmul when their formats allow it, as separate ones otherwise."""

import torch
from kvpilot.kernels.quant import quantize
from kvpilot.serving.models.layers import Linear, MergedLinear


def _weights(*rows: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, 48, generator=generator) * 0.1 for n in rows]


def test_float_projections_become_one_matmul_with_their_biases():
    weights, biases = _weights(32, 16, 16), [torch.randn(n) for n in (32, 16, 16)]
    merged = MergedLinear(weights, biases)
    x = torch.randn(5, 48)
    assert len(merged.parts) == 1
    for got, weight, bias in zip(merged(x), weights, biases, strict=True):
        torch.testing.assert_close(got, Linear(weight, bias)(x))
    assert merged.nbytes == sum(w.numel() * 4 + b.numel() * 4 for w, b in zip(weights, biases, strict=True))


def test_mixed_formats_fall_back_to_one_matmul_each():
    q, k = _weights(32, 16)
    weights = [q, quantize(k, "int8")]  # e.g. a GGUF file that stores one projection in more bits
    merged = MergedLinear(weights)
    x = torch.randn(3, 48)
    assert len(merged.parts) == 2
    for got, weight in zip(merged(x), weights, strict=True):
        assert torch.equal(got, Linear(weight)(x))
