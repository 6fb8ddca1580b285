"""Triton kernels run by Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, against torch.

Triton reads TRITON_INTERPRET once, when it is first imported (and torch imports it early), so
the kernel tests run in a child pytest process started with it set; in the main process they
are skipped and `test_kernels_under_the_triton_interpreter` runs that child and fails with its
output if any kernel test fails. The variable never leaks into the main test process.
"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kvpilot.kernels.quant import quantize
from kvpilot.kernels.quant.kv_cache import KVCache

pytestmark = pytest.mark.triton

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not IN_INTERPRETER,
    reason="runs in the TRITON_INTERPRET=1 child of test_kernels_under_the_triton_interpreter",
)
KERNEL_MODULES = ("kv_write", "paged_attention", "quant_matmul", "backend")
HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 24, 16  # GQA, a head_dim that is not a power of two


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the interpreter child")
def test_kernels_under_the_triton_interpreter():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__).relative_to(root)),
        ],
        cwd=root,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # every kernel test ran; the one skip is this launcher inside the child
    assert re.search(r"\d+ passed, 1 skipped in", result.stdout), result.stdout[-2000:]


@pytest.fixture(scope="module")
def kernels():
    modules = {name: importlib.import_module(f"kvpilot.kernels.triton.{name}") for name in KERNEL_MODULES}
    return SimpleNamespace(**modules)


def _paged_context(kv_cache_dtype: str, seq_lens: list[int], seed: int = 0):
    """Caches holding random K/V for each sequence in shuffled blocks: (key, value, block_tables)."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // BLOCK) for n in seq_lens) + 2
    key_cache, value_cache = (
        KVCache.allocate(num_blocks, BLOCK, KV_HEADS, DIM, kv_cache_dtype) for _ in "kv"
    )
    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(seq_lens), max(-(-n // BLOCK) for n in seq_lens), dtype=torch.int32)
    used = 0
    for seq, length in enumerate(seq_lens):
        count = -(-length // BLOCK)
        tables[seq, :count] = order[used : used + count]
        used += count
        key, value = torch.randn(2, length, KV_HEADS, DIM, generator=generator)
        key_cache.write(key, _slots(tables[seq], length))
        value_cache.write(value, _slots(tables[seq], length))
    return key_cache, value_cache, tables


def _slots(table: torch.Tensor, length: int, start: int = 0) -> torch.Tensor:
    positions = torch.arange(start, length)
    return table[positions // BLOCK].long() * BLOCK + positions % BLOCK


def _reference_attention(query, key_cache, value_cache, tables, query_lens, seq_lens):
    """Gather each sequence's K/V by its block table, then causal softmax attention in float32."""
    outputs, start = [], 0
    for seq, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        slots = _slots(tables[seq], seq_len)
        key, value = key_cache.read(slots), value_cache.read(slots)
        key, value = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (key, value))
        q = query[start : start + query_len]
        start += query_len
        scores = torch.einsum("qhd,khd->hqk", q, key) * DIM**-0.5
        q_pos = torch.arange(seq_len - query_len, seq_len)
        scores = scores.masked_fill(torch.arange(seq_len)[None, None] > q_pos[None, :, None], float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), value))
    return torch.cat(outputs)


@interpreted
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_fused_kv_write_matches_torch(kernels, kv_cache_dtype):
    generator = torch.Generator().manual_seed(1)
    key, value = torch.randn(2, 6, KV_HEADS, DIM, generator=generator) * 4
    slots = torch.tensor([17, 3, -1, 40, 0, 31])  # -1: a padding token, skipped
    written = slots >= 0
    expected = [KVCache.allocate(3, BLOCK, KV_HEADS, DIM, kv_cache_dtype) for _ in "kv"]
    expected[0].write(key[written], slots[written])
    expected[1].write(value[written], slots[written])
    got = [KVCache.allocate(3, BLOCK, KV_HEADS, DIM, kv_cache_dtype) for _ in "kv"]
    kernels.kv_write.reshape_and_cache(
        key, value, got[0].data, got[1].data, slots, kv_cache_dtype, got[0].scales, got[1].scales
    )
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))  # bit-identical
        assert (a.scales is None and b.scales is None) or torch.equal(a.scales, b.scales)


@interpreted
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_paged_prefill_with_mixed_chunks_matches_reference(kernels, kv_cache_dtype):
    # a whole prompt, a second chunk after 20 cached tokens, and a single decode token
    query_lens, seq_lens = [19, 9, 1], [19, 29, 40]
    key_cache, value_cache, tables = _paged_context(kv_cache_dtype, seq_lens)
    query = torch.randn(sum(query_lens), HEADS, DIM, generator=torch.Generator().manual_seed(2))
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = kernels.paged_attention.paged_attention_prefill(
        query, key_cache.data, value_cache.data, tables, query_start_loc,
        torch.tensor(seq_lens, dtype=torch.int32), max(query_lens), DIM**-0.5, kv_cache_dtype,
        key_cache.scales, value_cache.scales,
    )  # fmt: skip
    expected = _reference_attention(query, key_cache, value_cache, tables, query_lens, seq_lens)
    assert torch.allclose(out, expected, atol=1e-5)


@interpreted
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_paged_decode_matches_reference(kernels, kv_cache_dtype):
    seq_lens = [1, 16, 35]
    key_cache, value_cache, tables = _paged_context(kv_cache_dtype, seq_lens, seed=3)
    query = torch.randn(len(seq_lens), HEADS, DIM, generator=torch.Generator().manual_seed(4))
    out = kernels.paged_attention.paged_attention_decode(
        query, key_cache.data, value_cache.data, tables, torch.tensor(seq_lens, dtype=torch.int32),
        DIM**-0.5, kv_cache_dtype, key_cache.scales, value_cache.scales,
    )  # fmt: skip
    expected = _reference_attention(query, key_cache, value_cache, tables, [1, 1, 1], seq_lens)
    assert torch.allclose(out, expected, atol=1e-5)


@interpreted
@pytest.mark.parametrize(
    ("mode", "group_size", "in_features"),
    [("int4", 32, 96), ("int4", 64, 80), ("int4", 128, 256), ("int8", None, 100), ("int8", 32, 96)],
)
def test_weight_only_dequant_matmul_matches_reference(kernels, mode, group_size, in_features):
    generator = torch.Generator().manual_seed(5)
    weight = quantize(torch.randn(40, in_features, generator=generator), mode, group_size)
    x = torch.randn(5, in_features, generator=generator)
    linear = kernels.quant_matmul.int4_linear if mode == "int4" else kernels.quant_matmul.int8_linear
    assert torch.allclose(linear(x, weight), x @ weight.dequantize().t(), atol=1e-4)


@interpreted
def test_kernels_reject_bad_input(kernels):
    cache = KVCache.allocate(2, BLOCK, KV_HEADS, DIM, "int8").data
    key = torch.zeros(1, KV_HEADS, DIM)
    with pytest.raises(ValueError, match="k_scale"):
        kernels.kv_write.reshape_and_cache(key, key, cache, cache, torch.tensor([0]), "int8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kernels.kv_write.reshape_and_cache(key, key, cache, cache, torch.tensor([0]), "int4")
    small = torch.zeros(2, 8, KV_HEADS, DIM)
    with pytest.raises(ValueError, match="block_size"):
        kernels.paged_attention.paged_attention_decode(
            torch.zeros(1, HEADS, DIM), small, small, torch.zeros(1, 1, dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32), 1.0,
        )  # fmt: skip


@interpreted
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_triton_backend_matches_the_cpu_backend_on_engine_metadata(kernels, kv_cache_dtype):
    """What the model calls through `select_backend`: same caches, same attention output."""
    from kvpilot.kernels.attention import build_attention_metadata, paged_attention_reference
    from kvpilot.kernels.backend import select_backend

    triton_backend, cpu_backend = kernels.backend.TRITON_BACKEND, select_backend("cpu")
    generator = torch.Generator().manual_seed(6)
    metadata = build_attention_metadata([5, 1, 17], [0, 20, 3], [[4, 0], [1, 2], [3, 5]], BLOCK)
    k, v = torch.randn(2, 23, KV_HEADS, DIM, generator=generator)
    q = torch.randn(23, HEADS, DIM, generator=generator)
    caches = {}
    for name, backend in (("cpu", cpu_backend), ("triton", triton_backend)):
        if kv_cache_dtype == "auto":
            k_cache, v_cache = torch.zeros(2, 6, BLOCK, KV_HEADS, DIM)
        else:
            k_cache, v_cache = (KVCache.allocate(6, BLOCK, KV_HEADS, DIM, kv_cache_dtype) for _ in "kv")
        backend.write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        caches[name] = (k_cache, v_cache)
    for a, b in zip(caches["cpu"], caches["triton"], strict=True):
        assert torch.equal(a[torch.arange(6)], b[torch.arange(6)])  # blocks, dequantized when quantized
    k_cache, v_cache = caches["triton"]
    decodes = build_attention_metadata([1, 1], [4, 30], [[4, 0], [1, 2]], BLOCK)  # the decode kernel
    for batch in (metadata, decodes):
        rows = q[: int(batch.query_start_loc[-1])]
        expected = paged_attention_reference(rows, k_cache, v_cache, batch, DIM**-0.5)
        got = triton_backend.paged_attention(rows, k_cache, v_cache, batch, DIM**-0.5)
        assert torch.allclose(got, expected, atol=1e-5)


@interpreted
def test_triton_backend_quantized_linear_keeps_leading_dimensions(kernels):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 64, generator=generator)
    for mode in ("int8", "int4", "fp8"):
        weight = quantize(torch.randn(48, 64, generator=generator), mode)
        got = kernels.backend.TRITON_BACKEND.quantized_linear(x, weight)
        assert got.shape == (2, 3, 48)
        assert torch.allclose(got, x @ weight.dequantize().t(), atol=1e-4)


HALF_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3}  # a few units in the last place


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_every_triton_path_takes_half_inputs(kernels, dtype, kv_cache_dtype):
    """`--dtype auto` serves bf16/fp16 on CUDA: cache writes, prefill and decode attention in the
    model dtype give what the CPU backend and the float32 definition give for the same inputs."""
    from kvpilot.kernels.attention import build_attention_metadata, paged_attention_reference
    from kvpilot.kernels.backend import select_backend

    triton_backend, cpu_backend = kernels.backend.TRITON_BACKEND, select_backend("cpu")
    generator = torch.Generator().manual_seed(8)
    metadata = build_attention_metadata([5, 1, 17], [0, 20, 3], [[4, 0], [1, 2], [3, 5]], BLOCK)
    k, v = torch.randn(2, 23, KV_HEADS, DIM, generator=generator).to(dtype)
    q = torch.randn(23, HEADS, DIM, generator=generator).to(dtype)
    caches = {}
    for name, backend in (("cpu", cpu_backend), ("triton", triton_backend)):
        if kv_cache_dtype == "auto":
            k_cache, v_cache = torch.zeros(2, 6, BLOCK, KV_HEADS, DIM, dtype=dtype)
        else:
            k_cache, v_cache = (
                KVCache.allocate(6, BLOCK, KV_HEADS, DIM, kv_cache_dtype, dtype) for _ in "kv"
            )
        backend.write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        caches[name] = (k_cache, v_cache)
    for a, b in zip(caches["cpu"], caches["triton"], strict=True):
        assert torch.equal(a[torch.arange(6)], b[torch.arange(6)])
    k_cache, v_cache = caches["triton"]
    decodes = build_attention_metadata([1, 1], [4, 30], [[4, 0], [1, 2]], BLOCK)
    for batch in (metadata, decodes):
        rows = q[: int(batch.query_start_loc[-1])]
        got = triton_backend.paged_attention(rows, k_cache, v_cache, batch, DIM**-0.5)
        assert got.dtype == dtype
        expected = paged_attention_reference(rows.float(), *_as_float32(k_cache, v_cache), batch, DIM**-0.5)
        assert torch.allclose(got.float(), expected, atol=HALF_TOLERANCE[dtype]), (
            (got.float() - expected).abs().max()
        )


def _as_float32(*caches):
    """Float32 copies of caches (dequantized), so the reference runs in float32 throughout."""
    copies = []
    for cache in caches:
        if isinstance(cache, KVCache):
            blocks = torch.arange(cache.shape[0])
            cache = cache[blocks]
        copies.append(cache.float())
    return copies


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_quantized_linears_take_half_activations(kernels, dtype):
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 64, generator=generator).to(dtype)
    for mode in ("int8", "int4", "fp8"):
        weight = quantize(torch.randn(48, 64, generator=generator), mode)
        got = kernels.backend.TRITON_BACKEND.quantized_linear(x, weight)
        assert got.shape == (2, 3, 48) and got.dtype == dtype
        expected = x.float() @ weight.dequantize().float().t()
        assert torch.allclose(
            got.float(), expected, rtol=HALF_TOLERANCE[dtype], atol=HALF_TOLERANCE[dtype] * 8
        )
