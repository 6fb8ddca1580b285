"""kvpilot's int8 panel kernel (csrc/packed_int8.c, AVX-512 VNNI or AVX2): activations quantized per
token, integer products exact, the float epilogue exactly as documented, row by row whatever the
batch, and the same bits from both instruction sets."""

import contextlib

import pytest
import torch
from kvpilot.kernels import cpu_extension, native_build
from kvpilot.kernels.quant import int8, quantize
from kvpilot.kernels.quant.panel_int8 import PanelInt8

pytestmark = pytest.mark.skipif(
    not cpu_extension.supports_int8_panels(), reason="the int8 panel kernel needs AVX-512 VNNI or AVX2"
)
QMAX = 127
SHAPES = [(1, 1, 1), (5, 7, 17), (33, 160, 24), (300, 1537, 33)]  # partial panels and groups; > 256 rows
MAX_K_FOLDED = 2096  # csrc/packed_int8.c: the AVX2 kernel folds exact activations up to this k


def _layer(out: int, inputs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-QMAX, QMAX + 1, (out, inputs), dtype=torch.int8, generator=generator)
    return qweight, torch.rand(out, generator=generator) + 0.01


def _integer_product(rows: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """rows @ W^T, exact in float64, then rounded once to float32 as the kernel converts it."""
    return (rows.double() @ qweight.double().t()).float()


@pytest.mark.parametrize(("rows", "inputs", "out"), SHAPES)
@pytest.mark.parametrize("int8_activations", [True, False])
def test_packing_keeps_the_values_and_scales(rows, inputs, out, int8_activations):
    qweight, scales = _layer(out, inputs)
    packed = PanelInt8.pack(qweight, scales, int8_activations)
    assert torch.equal(packed.unpack(), qweight) and torch.equal(packed.scales, scales)
    assert packed.shape == (out, inputs) and packed.int8_activations == int8_activations


@pytest.mark.parametrize(("rows", "inputs", "out"), SHAPES)
def test_w8a8_is_the_integer_product_times_both_scales(rows, inputs, out):
    qweight, scales = _layer(out, inputs)
    x, bias = torch.randn(rows, inputs), torch.randn(out)
    unit = x.abs().amax(1, keepdim=True) / QMAX
    product = _integer_product(torch.div(x, unit).round(), qweight)
    packed = PanelInt8.pack(qweight, scales, int8_activations=True)
    assert torch.equal(packed.linear(x), product * (scales * unit))
    assert torch.equal(packed.linear(x, bias), torch.addcmul(bias, product, scales * unit))  # fused


def _exact_activations_product(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, folded: bool):
    """Weight-only int8: x = unit * (hi + lo / 126) (int8.split_rows_int7, the torch version), as
    two integer products (hi . w) + (lo . w) / 126, or (folded: AVX2 up to k = 2096) one,
    (126 hi + lo) . w, in steps of unit / 126."""
    rows = x.shape[0]
    parts, unit = int8.split_rows_int7(x)
    hi, lo, lo_weight = parts[:rows], parts[rows : 2 * rows], torch.tensor(1 / 126)
    if folded:
        return _integer_product(126 * hi + lo, qweight) * (scales * (unit / 126))
    product = torch.addcmul(_integer_product(hi, qweight), _integer_product(lo, qweight), lo_weight)
    return product * (scales * unit)


def _folds_here(inputs: int) -> bool:
    return cpu_extension.int8_panel_instruction() == "vpmaddwd" and inputs <= MAX_K_FOLDED


@pytest.mark.parametrize(("rows", "inputs", "out"), [*SHAPES, (9, MAX_K_FOLDED + 5, 20)])  # past folding
def test_exact_activations_are_integer_products(rows, inputs, out):
    qweight, scales = _layer(out, inputs)
    x = torch.randn(rows, inputs)
    packed = PanelInt8.pack(qweight, scales, int8_activations=False)
    result = packed.linear(x)
    assert torch.equal(result, _exact_activations_product(x, qweight, scales, _folds_here(inputs)))
    reference = x @ (qweight.float() * scales[:, None]).t()
    assert ((result - reference).norm() / reference.norm()).item() < 1e-3  # float activations, nearly


def test_worst_case_integer_products_are_exact():
    """+-127 against +-127, every sign combination, k = 4096: far past int16 and float32's 2^24."""
    signs = torch.tensor([1, -1]).repeat(8)
    qweight = (signs[:, None] * QMAX * torch.ones(16, 4096, dtype=torch.long)).to(torch.int8)
    qweight[:, 1::2] *= -1
    x = torch.cat([qweight, -qweight, torch.full((3, 4096), QMAX, dtype=torch.int8)]).float()
    result = PanelInt8.pack(qweight, torch.ones(16), int8_activations=True).linear(x)
    assert torch.equal(result, _integer_product(x, qweight))  # each row's unit is exactly 1


@pytest.mark.parametrize("int8_activations", [True, False])
def test_a_row_does_not_depend_on_its_batch(int8_activations):
    qweight, scales = _layer(70, 96)
    packed = PanelInt8.pack(qweight, scales, int8_activations)
    x = torch.randn(40, 96)
    alone = torch.cat([packed.linear(x[i : i + 1]) for i in range(40)])
    assert torch.equal(packed.linear(x), alone)


def test_too_many_inputs_for_int32_is_an_error():
    packed = PanelInt8.pack(torch.ones(1, 70000, dtype=torch.int8), torch.ones(1), int8_activations=True)
    with pytest.raises(RuntimeError, match="too many inputs"):
        packed.linear(torch.ones(1, 70000))


def test_quantized_weights_use_the_panels_here():
    """Both per-channel int8 modes, on a CPU where the kernel runs."""
    if not int8.use_int8_panels():
        pytest.skip(f"{int8.GEMM_ENV} names a library GEMM")
    weight = torch.randn(48, 64) * 0.05
    for mode in ("int8", "w8a8"):
        quantized = quantize(weight, mode)
        assert isinstance(quantized.packed, PanelInt8)
        assert quantized.packed.int8_activations == (mode == "w8a8")


@contextlib.contextmanager
def _kernels_built_for(march: str):
    """The library built for `march` (cached beside this run's own build) inside the block."""
    probes = (cpu_extension.load, cpu_extension.supports_int8_panels)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(native_build.MARCH_ENV, march)
        for probe in probes:
            probe.cache_clear()
        try:
            yield
        finally:
            monkeypatch.undo()
            for probe in probes:
                probe.cache_clear()


def test_the_avx2_kernel_gives_this_builds_bits_or_the_folded_product():
    """`vpmaddwd` (AVX2: any CPU of ours runs it) against this build's kernel (`vpdpbusd` on an
    AVX-512 VNNI CPU): W8A8, and exact activations past k = 2096 (two rows, hi and lo), give the
    same integer products and the same float epilogue, so the same bits; exact activations up to
    k = 2096 go in one row, 126 hi + lo, as documented."""
    past = MAX_K_FOLDED + 5
    layers = {inputs: _layer(40, inputs) for inputs in (1537, past)}
    x = {inputs: torch.randn(300, inputs) * 3 for inputs in layers}
    bias = torch.randn(40)
    packs = {(k, w8a8): PanelInt8.pack(*layers[k], w8a8) for k in layers for w8a8 in (True, False)}
    here = {key: packed.linear(x[key[0]], bias) for key, packed in packs.items()}
    with _kernels_built_for("haswell"):
        assert cpu_extension.int8_panel_instruction() == "vpmaddwd"
        avx2 = {key: packed.linear(x[key[0]], bias) for key, packed in packs.items()}
        folded = packs[1537, False].linear(x[1537][:7])
        # the largest folded sums: 126 hi + lo = +-7938 against +-127 in every one of k = 2096 products
        signs = torch.where(torch.arange(MAX_K_FOLDED) % 3 == 0, -1, 1)
        worst_weight = (QMAX * signs).to(torch.int8).repeat(8, 1)
        worst_x = torch.stack([signs, -signs]).float()
        worst = PanelInt8.pack(worst_weight, torch.ones(8), int8_activations=False).linear(worst_x)
    for key in [(1537, True), (past, True), (past, False)]:
        assert torch.equal(avx2[key], here[key])
    assert torch.equal(folded, _exact_activations_product(x[1537][:7], *layers[1537], folded=True))
    assert torch.equal(worst, _exact_activations_product(worst_x, worst_weight, torch.ones(8), folded=True))
    assert worst[0, 0].item() == pytest.approx(MAX_K_FOLDED * 127)  # far past int16, within int32
    assert cpu_extension.int8_panel_instruction() in ("vpdpbusd", "vpmaddwd")  # this run's build again
