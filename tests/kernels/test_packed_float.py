"""float32 weights pre-packed for oneDNN or kvpilot's panel kernel: the same products as F.linear,
row by row, whatever the batch."""

import pytest
import torch
import torch.nn.functional as F
from kvpilot.kernels import cpu_extension, packed_float
from kvpilot.kernels.backend import select_backend
from kvpilot.kernels.packed_float import (
    OnednnFloatWeight,
    PanelFloatWeight,
    can_pack,
    float_gemm,
    pack_float_weight,
)

needs_panels = pytest.mark.skipif(
    not cpu_extension.supports_packed_sgemm(), reason="the panel GEMM needs AVX2 + FMA and a C compiler"
)
LAYOUTS = [OnednnFloatWeight, pytest.param(PanelFloatWeight, marks=needs_panels)]


def _weight(out: int = 96, inputs: int = 64) -> torch.Tensor:
    return torch.randn(out, inputs, generator=torch.Generator().manual_seed(out)) * 0.1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_linear_matches_f_linear_and_keeps_the_leading_dims(layout):
    weight, bias = _weight(), torch.randn(96)
    packed = layout.pack(weight)
    for x in (torch.randn(1, 64), torch.randn(37, 64), torch.randn(2, 5, 64)):
        torch.testing.assert_close(packed.linear(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed.linear(x, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.dense(), weight)
    assert packed.shape == (96, 64) and packed.nbytes == weight.numel() * 4


@needs_panels
@pytest.mark.parametrize(
    ("out_features", "in_features", "rows"),
    [
        (7, 5, 1),  # less than one panel
        (40, 70, 0),  # no rows at all (a step that wants no logits)
        (100, 70, 29),  # a partial last panel; rows in whole tiles plus a partial one (16 or 6 rows)
        (48, 1536, 5),  # k in three slices (the kernel's 576-wide k blocks)
        (40, 1000, 203),  # uneven k slices, rows in two even blocks of 102 (at most 128 each)
        (40, 70, 113),  # one block in even tiles (8 of 14-15 rows), not 7 x 16 + 1
        (24, 30, 257),  # three blocks of 86 and 85
    ],
)
def test_panel_kernel_edges_match_f_linear(out_features, in_features, rows):
    weight, bias = _weight(out_features, in_features), torch.randn(out_features)
    packed = PanelFloatWeight.pack(weight)
    assert packed.panels.shape == (-(-out_features // 16), in_features, 16)
    wide = torch.randn(rows, 2 * in_features)
    for x in (wide[:, ::2], wide[:, 1 : in_features + 1]):  # strided columns (copied); a row stride
        torch.testing.assert_close(packed.linear(x, bias), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
    assert torch.equal(packed.dense(), weight)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_row_does_not_depend_on_its_batch(layout):
    packed = layout.pack(_weight(49152 // 64, 64))
    x = torch.randn(129, 64)  # two blocks; its tiles are not those of any smaller batch
    alone = torch.cat([packed.linear(row[None]) for row in x])
    for rows in (129, 113, 3):
        assert torch.equal(packed.linear(x[:rows]), alone[:rows])


def test_only_float32_cpu_matrices_are_packed():
    assert can_pack(_weight())
    assert not can_pack(_weight().bfloat16()) and not can_pack(torch.randn(8))
    assert select_backend("cpu").prepare_linear_weight(_weight().bfloat16()).dtype == torch.bfloat16
    expected = PanelFloatWeight if float_gemm() == "panels" else OnednnFloatWeight
    assert isinstance(select_backend("cpu").prepare_linear_weight(_weight()), expected)
    for layout in (OnednnFloatWeight, PanelFloatWeight):
        with pytest.raises(ValueError, match="float32"):
            layout.pack(_weight().half())


def test_the_gemm_follows_the_cpu_unless_forced(monkeypatch):
    """The panels wherever their kernel builds, oneDNN elsewhere; KVPILOT_FLOAT_GEMM overrides,
    and a wrong value names the variable."""
    assert float_gemm() == ("panels" if cpu_extension.supports_packed_sgemm() else "onednn")
    try:
        for forced in ("onednn", "bogus"):
            monkeypatch.setenv(packed_float.GEMM_ENV, forced)
            float_gemm.cache_clear()
            if forced == "bogus":
                with pytest.raises(ValueError, match="KVPILOT_FLOAT_GEMM"):
                    float_gemm()
            else:
                assert isinstance(pack_float_weight(_weight()), OnednnFloatWeight)
    finally:
        monkeypatch.delenv(packed_float.GEMM_ENV)
        float_gemm.cache_clear()
