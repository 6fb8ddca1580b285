"""The W8A8 integer product is exact on every x86 CPU.

fbgemm's AVX2 kernel (CPUs without VNNI) adds pairs of u8 x s8 products in saturating int16;
VNNI accumulates them in int32. The engine probes which one it has and, without VNNI, sends
activations in two 7-bit halves. `FBGEMM_ENABLE_INSTRUCTIONS=AVX2` makes fbgemm take its AVX2
kernel on any CPU, so the non-VNNI path is exercised for real here whatever this machine is.
oneDNN's int8 GEMM (used where its probe finds it exact) is checked the same way, with
`ONEDNN_MAX_CPU_ISA=AVX2` standing in for a CPU whose oneDNN kernel saturates.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kvpilot.kernels import cpu_extension
from kvpilot.kernels.quant import Int8Weight, int8, quantize
from kvpilot.kernels.quant.onednn_int8 import OnednnInt8, onednn_int8_is_exact
from kvpilot.kernels.quant.panel_int8 import PanelInt8

QMAX = 127
INT16_MAX = 2**15 - 1


def _worst_case(tokens: int = 5, out: int = 24, in_features: int = 160) -> tuple[torch.Tensor, Int8Weight]:
    """Activations and weights at +-127, every sign combination, plus a few random rows."""
    signs = torch.tensor([1, -1]).repeat(out // 2)
    weight = (signs[:, None] * torch.full((out, in_features), QMAX)).to(torch.int8)
    weight[-4:] = torch.randint(-QMAX, QMAX + 1, (4, in_features), generator=torch.Generator().manual_seed(0))
    random_rows = torch.randint(-QMAX, QMAX + 1, (tokens - 2, in_features), generator=torch.Generator())
    random_rows[:, 0] = QMAX  # max |x| = 127 in every row: a per-token unit of exactly 1
    x = torch.cat(
        [torch.full((1, in_features), QMAX), torch.full((1, in_features), -QMAX), random_rows]
    ).float()
    return x, Int8Weight.from_int8(weight, torch.ones(out, 1), int8_activations=True)


def _assert_exact(x: torch.Tensor, weight: Int8Weight) -> None:
    # Each row's max |x| is 127, so its per-token unit is 1: the result is the integer product.
    exact = x.double() @ weight.qweight.double().t()
    assert torch.equal(weight.linear(x).double(), exact)


def _skip_unless_onednn() -> None:
    if not int8.use_onednn_int8():
        pytest.skip("oneDNN's int8 GEMM is not used on this CPU (not exact, or not compiled for it)")


@pytest.fixture(params=["panels", "onednn", "fbgemm"])
def gemm(request, monkeypatch) -> str:
    """Which int8 GEMM the W8A8 weights built in the test get; kvpilot's panels only where the
    kernel is compiled in (AVX-512 VNNI or AVX2), oneDNN only where its probe passes."""
    if request.param == "panels" and not int8.use_int8_panels():
        pytest.skip("kvpilot's W8A8 panel kernel is not compiled for this CPU (no AVX-512 VNNI or AVX2)")
    if request.param != "panels":
        monkeypatch.setattr(int8, "use_int8_panels", lambda: False)
    if request.param == "onednn":
        _skip_unless_onednn()
    if request.param == "fbgemm":
        monkeypatch.setattr(int8, "use_onednn_int8", lambda: False)
    return request.param


def test_w8a8_worst_case_equals_the_integer_product(gemm):
    x, weight = _worst_case()
    assert isinstance(weight.packed, PanelInt8) == (gemm == "panels")
    assert isinstance(weight.packed, OnednnInt8) == (gemm == "onednn")
    _assert_exact(x, weight)


@pytest.mark.parametrize("mode", ["w8a8", "int8"])
def test_onednn_and_fbgemm_give_the_same_outputs(mode, monkeypatch):
    """The same integer products either way; only the float epilogue may round differently."""
    _skip_unless_onednn()
    w = torch.randn(96, 320, generator=torch.Generator().manual_seed(3)) * 0.05
    x = torch.randn(40, 320, generator=torch.Generator().manual_seed(4))
    x[:, 5] *= 30  # an outlier channel
    onednn = quantize(w, mode)
    monkeypatch.setattr(int8, "use_onednn_int8", lambda: False)
    fbgemm = quantize(w, mode)
    assert isinstance(onednn.packed, OnednnInt8) and not isinstance(fbgemm.packed, OnednnInt8)
    assert torch.equal(onednn.qweight, fbgemm.qweight) and onednn.nbytes == fbgemm.nbytes
    torch.testing.assert_close(onednn.linear(x), fbgemm.linear(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["w8a8", "int8"])
def test_onednn_linear_is_the_same_without_the_native_kernels(mode, monkeypatch):
    _skip_unless_onednn()
    q = quantize(torch.randn(48, 160, generator=torch.Generator().manual_seed(5)) * 0.05, mode)
    x = torch.randn(7, 160, generator=torch.Generator().manual_seed(6))
    native = q.linear(x)
    monkeypatch.setattr(cpu_extension, "load", lambda: None)
    assert torch.equal(q.linear(x), native)


def test_onednn_worst_case_integer_products_are_exact():
    """+-127 against +-127, every sign combination and a long K: int16 pair sums would saturate."""
    if not onednn_int8_is_exact():
        pytest.skip("oneDNN's int8 GEMM is not exact on this CPU (the probe says so)")
    signs = torch.tensor([1, -1]).repeat(8)
    weight = (signs[:, None] * QMAX * torch.ones(16, 2048, dtype=torch.long)).to(torch.int8)
    weight[:, 1::2] *= -1  # mixed signs within rows too
    rows = torch.cat([weight, -weight, torch.full((3, 2048), QMAX, dtype=torch.int8)])
    product = OnednnInt8.pack(weight, torch.ones(16)).linear(rows)
    exact = rows.double() @ weight.double().t()  # sums up to 127 * 127 * 2048 < 2^25
    # float32 output: integers beyond 2^24 round to even, as float(exact int32) would.
    assert torch.equal(product.double(), exact.float().double())


def test_without_vnni_no_pair_of_products_leaves_int16(monkeypatch):
    monkeypatch.setattr(int8, "use_int8_panels", lambda: False)
    monkeypatch.setattr(int8, "use_onednn_int8", lambda: False)
    monkeypatch.setattr(int8, "one_pass_int8_is_exact", lambda: False)
    sent = []

    def recording_fbgemm(rows, packed, reduce_range):
        sent.append((rows.clone(), reduce_range))
        return torch.ops.quantized.linear_dynamic(rows, packed, reduce_range)

    monkeypatch.setattr(int8, "fbgemm_linear", recording_fbgemm)
    x, weight = _worst_case()
    _assert_exact(x, weight)

    assert sent, "the w8a8 linear never reached fbgemm"
    max_weight = int(weight.qweight.abs().max())
    for rows, reduce_range in sent:
        assert reduce_range, "8-bit activations sent without VNNI"
        assert torch.equal(rows, rows.round()), "fbgemm must receive integers (scale 1)"
        # The anchor row spans [-64, 63]: fbgemm's 7-bit range then has scale 1, zero point 64.
        assert (int(rows.min()), int(rows.max())) == (-64, 63)
        largest_u8 = int(rows.max()) + 64
        assert 2 * largest_u8 * max_weight <= INT16_MAX


def test_split_int8_rows_recombines_exactly():
    q = torch.arange(-QMAX, QMAX + 1).float()[None, :].repeat(3, 1)
    rows = int8.split_int8_rows(q)
    high, low = rows[:3], rows[3:6]
    assert torch.equal(2 * high + low, q)
    assert set(low.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(rows[-1:], int8._anchor_row(q.shape[1], 63))


AVX2_SCRIPT = textwrap.dedent(
    """
    import torch
    from kvpilot.kernels.quant import int8, quantize

    assert int8.one_pass_int8_is_exact() is False, "the probe must see AVX2's saturation"
    q = torch.full((8, 64), 127, dtype=torch.int8)
    weight = int8.Int8Weight.from_int8(q, torch.ones(8, 1), int8_activations=True)
    assert not isinstance(weight.packed, int8.OnednnInt8), "KVPILOT_INT8_GEMM=fbgemm keeps fbgemm"
    x = torch.full((3, 64), 127.0)
    assert torch.equal(weight.linear(x).double(), x.double() @ q.double().t())
    # The issue's failing case: Gaussian activations through a 64x192 layer.
    w = quantize(torch.randn(64, 192, generator=torch.Generator().manual_seed(0)) * 0.05, "w8a8")
    x = torch.randn(33, 192, generator=torch.Generator().manual_seed(1))
    unit = x.abs().amax(-1, keepdim=True) / 127
    reference = ((x / unit).round() * unit) @ w.dequantize().t()
    error = ((w.linear(x) - reference).norm() / reference.norm()).item()
    assert error < 1e-5, error
    print("exact on fbgemm's AVX2 kernel")
    """
)


def test_fbgemm_avx2_kernel_is_exact_in_a_child_process():
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "KVPILOT_INT8_GEMM": "fbgemm"}
    result = subprocess.run(
        [sys.executable, "-c", AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact on fbgemm's AVX2 kernel" in result.stdout


@pytest.mark.parametrize("forced", ["AVX2", None])
def test_one_pass_saturates_on_avx2_so_the_probe_matters(forced):
    """The hazard itself, so the probe's verdict is known to be needed: fbgemm's AVX2 kernel
    gets the all-127 product wrong in one 8-bit pass."""
    script = textwrap.dedent(
        """
        import torch
        from kvpilot.kernels.quant import int8
        q = torch.full((8, 64), 127, dtype=torch.int8)
        packed = int8._prepack(q, torch.ones(8))
        rows = torch.cat([torch.full((1, 64), 127.0), int8._anchor_row(64, 127)])
        one_pass = int8.fbgemm_linear(rows, packed, reduce_range=False)[0, 0].item()
        print(one_pass == 127 * 127 * 64, int8.one_pass_int8_is_exact())
        """
    )
    env = dict(os.environ)
    if forced:
        env["FBGEMM_ENABLE_INSTRUCTIONS"] = forced
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one_pass_right, probe = result.stdout.split()
    assert one_pass_right == probe  # the probe reports exactly whether one pass is right
    if forced == "AVX2":
        assert one_pass_right == "False"


ONEDNN_SCRIPT = textwrap.dedent(
    """
    import torch
    from kvpilot.kernels.quant import int8, quantize
    from kvpilot.kernels.quant.onednn_int8 import OnednnInt8, onednn_int8_is_exact

    q = torch.full((8, 256), 127, dtype=torch.int8)
    product = OnednnInt8.pack(q, torch.ones(8)).linear(torch.full((3, 256), 127, dtype=torch.int8))
    right = bool((product == 127 * 127 * 256).all())
    weight = int8.Int8Weight.from_int8(q, torch.ones(8, 1), int8_activations=True)
    x = torch.full((3, 256), 127.0)
    exact = torch.equal(weight.linear(x).double(), x.double() @ q.double().t())
    print(right, onednn_int8_is_exact(), int8.use_onednn_int8(), isinstance(weight.packed, OnednnInt8), exact)
    """
)


@pytest.mark.parametrize("forced", ["AVX2", None])
def test_onednn_probe_says_whether_its_product_is_right(forced):
    """oneDNN's AVX2 int8 kernel gets the all-127 product wrong; the probe sees it, the weights
    then go to fbgemm, and the linear stays exact."""
    env = dict(os.environ)
    if forced:
        env["ONEDNN_MAX_CPU_ISA"] = forced
    result = subprocess.run([sys.executable, "-c", ONEDNN_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    right, probe, chosen, uses_onednn, exact = result.stdout.split()
    assert right == probe  # the probe reports exactly whether oneDNN's product is right
    assert chosen == uses_onednn and (probe == "True" or chosen == "False")  # never where it is wrong
    assert exact == "True"
    if forced == "AVX2":
        assert right == "False"


def test_the_int8_gemm_chosen_is_never_a_reference_kernel():
    """Where oneDNN has no compiled kernel for its packed int8 layout (AMD Zen 4 with AVX-512 VNNI)
    it runs its reference matmul: exact, ~1000x slower than fbgemm, and `use_onednn_int8` must
    not take it. The weights the engine builds multiply within 5x of fbgemm's time, one thread."""
    weight = quantize(torch.randn(512, 576, generator=torch.Generator().manual_seed(7)) * 0.05, "w8a8")
    fbgemm = Int8Weight(
        weight.scales, weight.group_size, None, int8._prepack(weight.qweight, weight.scales[:, 0]), True
    )
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(8))
    chosen_s, fbgemm_s = (int8._best_time_s(lambda w=w: w.linear(x)) for w in (weight, fbgemm))
    assert chosen_s < 5 * fbgemm_s, (
        f"{type(weight.packed).__name__}: {chosen_s / fbgemm_s:.0f}x fbgemm's time"
    )
