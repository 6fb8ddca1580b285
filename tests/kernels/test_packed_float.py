"""float32 weights pre-packed for oneDNN: the same products as F.linear, row by row."""

import pytest
import torch
import torch.nn.functional as F
from kvpilot.kernels.backend import select_backend
from kvpilot.kernels.packed_float import PackedFloatWeight, can_pack


def _weight(out: int = 96, inputs: int = 64) -> torch.Tensor:
    return torch.randn(out, inputs, generator=torch.Generator().manual_seed(out)) * 0.1


def test_packed_linear_matches_f_linear_and_keeps_the_leading_dims():
    weight, bias = _weight(), torch.randn(96)
    packed = PackedFloatWeight.pack(weight)
    for x in (torch.randn(1, 64), torch.randn(37, 64), torch.randn(2, 5, 64)):
        torch.testing.assert_close(packed.linear(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed.linear(x, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.dense(), weight)
    assert packed.shape == (96, 64) and packed.nbytes == weight.numel() * 4


def test_a_row_does_not_depend_on_its_batch():
    packed = PackedFloatWeight.pack(_weight(49152 // 64, 64))
    x = torch.randn(129, 64)
    alone = torch.cat([packed.linear(row[None]) for row in x[:3]])
    assert torch.equal(packed.linear(x)[:3], alone)


def test_only_float32_cpu_matrices_are_packed():
    assert can_pack(_weight())
    assert not can_pack(_weight().bfloat16()) and not can_pack(torch.randn(8))
    assert select_backend("cpu").prepare_linear_weight(_weight().bfloat16()).dtype == torch.bfloat16
    assert isinstance(select_backend("cpu").prepare_linear_weight(_weight()), PackedFloatWeight)
    with pytest.raises(ValueError, match="float32"):
        PackedFloatWeight.pack(_weight().half())
