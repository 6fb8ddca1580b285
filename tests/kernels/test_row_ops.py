"""The native row-wise ops (kernels/row_ops.py) against their torch definitions."""

import pytest
import torch
from kvpilot.kernels import cpu_extension, row_ops

pytestmark = pytest.mark.skipif(cpu_extension.load() is None, reason="no C compiler here")
SHAPES = [(1, 576), (7, 13), (40, 64), (130, 1000)]  # rows on one thread and split; ragged tails


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_rms_norm_matches_torch(rows, cols):
    generator = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(rows, cols + 5, generator=generator)[:, 2 : cols + 2] * 3  # strided rows
    weight = torch.randn(cols, generator=generator)
    assert cpu_extension.supports_rows(x, weight)
    torch.testing.assert_close(row_ops.rms_norm_cpu(x, weight, 1e-5), row_ops.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_add_rms_norm_adds_in_place_then_normalizes(rows, cols):
    generator = torch.Generator().manual_seed(rows * cols)
    x, delta = torch.randn(2, rows, cols, generator=generator)
    weight = torch.randn(cols, generator=generator)
    expected_x = x.clone()
    expected = row_ops.add_rms_norm(expected_x, delta, weight, 1e-6)
    normed = row_ops.add_rms_norm_cpu(x, delta, weight, 1e-6)
    assert torch.equal(x, expected_x)  # the residual stream: exactly x + delta
    torch.testing.assert_close(normed, expected)


@pytest.mark.parametrize("rows, n", [(1, 1536), (5, 11), (64, 40)])
def test_silu_and_mul_matches_torch(rows, n):
    generator = torch.Generator().manual_seed(rows + n)
    gate_up = torch.randn(rows, 2 * n, generator=generator) * 6
    gate_up[0, :2] = torch.tensor([-100.0, 100.0])  # e^x clamped at both ends
    torch.testing.assert_close(row_ops.silu_and_mul_cpu(gate_up), row_ops.silu_and_mul(gate_up))


@pytest.mark.parametrize("tokens, heads, head_dim", [(1, 12, 64), (5, 3, 6), (96, 12, 64), (40, 2, 128)])
def test_rotary_matches_torch_bit_for_bit(tokens, heads, head_dim):
    """q and k heads as the model hands them (a strided view of the qkv rows), at scattered
    positions: the same products and sums as the torch path, so the same bits."""
    generator = torch.Generator().manual_seed(tokens * heads + head_dim)
    qkv = torch.randn(tokens, heads + 3, head_dim, generator=generator) * 4
    x = qkv[:, :heads]
    positions = torch.randint(0, 500, (tokens,), generator=generator)
    angles = torch.rand(500, head_dim, generator=generator) * 6.3
    cos, signed_sin = angles.cos(), angles.sin()
    assert cpu_extension.supports_rotary(x, cos)
    rotated = row_ops.rotary_cpu(x, positions, cos, signed_sin)
    assert rotated.shape == x.shape and torch.equal(rotated, row_ops.rotary(x, positions, cos, signed_sin))
    assert not torch.equal(rotated, row_ops.rotary(x, positions.flip(0), cos, signed_sin)) or tokens == 1


def test_rotary_refuses_positions_outside_its_tables():
    x, table = torch.randn(3, 2, 8), torch.randn(16, 8)
    for bad in (16, -1):
        with pytest.raises(IndexError, match="positions"):
            row_ops.rotary_cpu(x, torch.tensor([0, bad, 1]), table, table)


def test_other_dtypes_and_layouts_take_the_torch_path():
    x = torch.randn(4, 8, dtype=torch.float64)
    assert not cpu_extension.supports_rows(x)
    torch.testing.assert_close(
        row_ops.rms_norm_cpu(x, torch.ones(8, dtype=torch.float64), 1e-5),
        x * x.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt(),
    )
    assert not cpu_extension.supports_rows(torch.randn(8, 4).t())
    table = torch.randn(16, 8)
    assert not cpu_extension.supports_rotary(torch.randn(2, 3, 8).half(), table)
    assert not cpu_extension.supports_rotary(torch.randn(2, 8, 3).transpose(1, 2), table)


@pytest.mark.parametrize("cols", [1, 63, 64, 65, 1000, 49152])  # within, at and past a 64-wide block
@pytest.mark.parametrize("values", ["gaussian", "ties", "nans", "masked"])
def test_argmax_matches_torch_argmax(cols, values):
    x = torch.randn(40, cols, generator=torch.Generator().manual_seed(cols))
    if values == "ties":
        x = x.round()  # many equal maxima: the first one wins
    elif values == "nans":
        x[torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.02] = float("nan")
    elif values == "masked":  # every token masked but one (a grammar), and a row of nothing but -inf
        x = torch.full_like(x, float("-inf"))
        x[1:, -1] = 0.0
    assert torch.equal(cpu_extension.argmax_rows(x), x.argmax(dim=-1))
    flipped = x.flip(1)  # the first of equal maxima is now another one
    assert torch.equal(row_ops.argmax_rows_cpu(flipped), flipped.argmax(dim=-1))
