"""The native CPU decode attention (float32 and int8 caches) against the reference paged attention."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kvpilot.kernels import cpu_extension, native_build
from kvpilot.kernels.attention import build_attention_metadata, paged_attention_reference
from kvpilot.kernels.quant.kv_cache import KVCache, kv_cache_tensor


@pytest.fixture(scope="module")
def native():
    if cpu_extension.load() is None:
        pytest.fail("the native CPU kernel did not build (is a C compiler installed?)")
    return cpu_extension


@pytest.mark.parametrize("head_major", [True, False], ids=["head-major", "token-major"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size"),
    # group sizes 3, 1, 4, 6 and 7 (the tiles hold 3 query heads); head_dim % 64 (AVX-512's value
    # tile), % 32 only (AVX2's) or neither
    [
        (9, 3, 64, 16),
        (4, 4, 32, 8),
        (8, 2, 20, 4),
        (6, 1, 16, 1),
        (8, 2, 64, 16),
        (7, 1, 128, 16),
        (6, 2, 96, 16),
    ],
)
def test_decode_matches_reference(
    native, num_heads, num_kv_heads, head_dim, block_size, kv_cache_dtype, head_major
):
    """In the engine's cache layout (head-major within a block), with the queries a slice of the
    fused q/k/v projection's rows, and in plain token-major rows with contiguous queries."""
    assert_decode_matches_reference(
        native, num_heads, num_kv_heads, head_dim, block_size, kv_cache_dtype, head_major
    )


def assert_decode_matches_reference(
    native, num_heads, num_kv_heads, head_dim, block_size, kv_cache_dtype, head_major
):
    generator = torch.Generator().manual_seed(num_heads * head_dim + block_size)
    seq_lens = [1, 5, block_size, 3 * block_size + 1, 37, 300]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    # Blocks of different sequences interleave in the pool, in a shuffled order.
    order = torch.randperm(num_blocks, generator=generator).tolist()
    block_tables, used = [], 0
    for n in seq_lens:
        count = -(-n // block_size)
        block_tables.append(order[used : used + count])
        used += count
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=generator) for _ in "kv")
    if kv_cache_dtype == "int8":  # every slot written once, through the cache's own quantizer
        k_cache, v_cache = (_int8_cache(cache, head_major) for cache in (k_cache, v_cache))
    elif head_major:
        k_cache, v_cache = (kv_cache_tensor(*shape, torch.float32).copy_(c) for c in (k_cache, v_cache))
    if num_kv_heads > 1 and block_size > 1:  # else both layouts are the same
        assert _values(k_cache).is_contiguous() is not head_major
    q = torch.randn(len(seq_lens), num_heads + 2 * num_kv_heads, head_dim, generator=generator)
    q = q[:, :num_heads] if head_major else q[:, :num_heads].contiguous()  # the engine's: q/k/v rows
    metadata = build_attention_metadata(
        [1] * len(seq_lens), [n - 1 for n in seq_lens], block_tables, block_size
    )
    scale = head_dim**-0.5

    expected = paged_attention_reference(q, k_cache, v_cache, metadata, scale)
    actual = native.paged_decode_attention(
        q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale
    )
    # int8: the kernel rounds q to 16 bits for the scores (its error 1/256 of the cache's own)
    tolerance = 2e-4 if kv_cache_dtype == "int8" else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


def _int8_cache(values: torch.Tensor, head_major: bool = True) -> KVCache:
    cache = KVCache.allocate(*values.shape, "int8")
    cache.write(values.flatten(0, 1), torch.arange(values.shape[0] * values.shape[1]))
    return cache if head_major else KVCache(cache.data.contiguous(), cache.scales, "int8")


def _values(cache: torch.Tensor | KVCache) -> torch.Tensor:
    return cache.data if isinstance(cache, KVCache) else cache


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_a_nan_query_stays_nan(native, kv_cache_dtype):
    """A NaN in one query head (a broken model) comes out as NaN in that head only, on either
    cache, rather than as finite garbage (the int8 path rounds queries to integers first)."""
    generator = torch.Generator().manual_seed(1)
    shape, seq_lens = (4, 16, 3, 64), [40, 32]  # whole register tiles: no scalar tail
    k_cache, v_cache = (torch.randn(shape, generator=generator) for _ in "kv")
    if kv_cache_dtype == "int8":
        k_cache, v_cache = _int8_cache(k_cache), _int8_cache(v_cache)
    q = torch.randn(2, 9, 64, generator=generator)
    q[1, 4, 7] = float("nan")
    metadata = build_attention_metadata([1, 1], [n - 1 for n in seq_lens], [[2, 0, 3], [1, 0]], 16)
    out = native.paged_decode_attention(q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, 0.125)
    assert out[1, 4].isnan().all()
    out[1, 4] = 0.0
    assert out.isfinite().all()


def test_int8_cache_is_supported_and_fp8_is_not(native):
    q = torch.zeros(1, 4, 8)
    assert native.supports(q, KVCache.allocate(2, 4, 2, 8, "int8"))
    assert native.supports(q, torch.zeros(2, 4, 2, 8))
    assert not native.supports(q, KVCache.allocate(2, 4, 2, 8, "fp8"))
    assert not native.supports(q.bfloat16(), torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16))


def test_library_is_cached_between_loads(native):
    assert native.load() is native.load()
    assert native_build.library_path().exists()


def test_a_background_build_is_the_one_load_uses(monkeypatch, tmp_path):
    """`kvpilot serve` starts the build before importing the model; a load meanwhile waits for it
    (one build per process), and finds the library it made."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = []
    build = native_build._build
    monkeypatch.setattr(native_build, "_build", lambda *args: builds.append(args) or build(*args))
    threads = [native_build.prebuild_in_background() for _ in range(2)]
    library = native_build.ensure_built()  # waits for the background build, builds nothing itself
    for thread in threads:
        thread.join(timeout=120)
    assert library == native_build.library_path() and library.exists()
    built = list((tmp_path / "kvpilot" / "kernels").iterdir())
    assert built == [library] and len(builds) == 1  # built once; no leftover objects or folders
    mtime = library.stat().st_mtime_ns
    assert native_build.ensure_built() == library and library.stat().st_mtime_ns == mtime


def test_exiting_during_a_background_build_leaves_no_compiler_or_scratch_folder(tmp_path):
    """`kvpilot serve` exits (a bad checkpoint, say) while the background build runs: its
    compilers stop with it and the cache keeps no half-built scratch folder."""
    script = (
        "import time; from kvpilot.kernels import native_build\n"
        "native_build.prebuild_in_background()\n"
        "deadline = time.monotonic() + 60\n"
        "while not any(native_build.cache_dir().glob('tmp*/')) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "assert any(native_build.cache_dir().glob('tmp*/')), 'the build did not start'\n"
        "time.sleep(0.3)\n"  # the compilers are running
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    assert list((tmp_path / "kvpilot" / "kernels").iterdir()) == []
    running = [cmdline for cmdline in _command_lines() if str(tmp_path).encode() in cmdline]
    assert running == []


def _command_lines() -> list[bytes]:
    lines = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # the process exited meanwhile
            lines.append((proc / "cmdline").read_bytes())
    return lines


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_portable_build_matches_reference(monkeypatch, tmp_path, kv_cache_dtype):
    """KVPILOT_MARCH=x86-64 (no AVX2): the kernels' plain C paths, which no machine of ours runs
    otherwise; the panel GEMMs are not compiled in, so the engine keeps oneDNN's and fbgemm's."""
    flags = native_build.compiler_flags()  # this run's own (KVPILOT_MARCH may be set for it)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(native_build.MARCH_ENV, "x86-64")
    probes = (cpu_extension.load, cpu_extension.supports_packed_sgemm, cpu_extension.supports_int8_panels)
    for probe in probes:
        probe.cache_clear()
    try:
        assert "-march=x86-64" in native_build.compiler_flags()
        assert not cpu_extension.supports_packed_sgemm() and not cpu_extension.supports_int8_panels()
        for shape in [(9, 3, 64, 16), (8, 2, 20, 4)]:
            assert_decode_matches_reference(cpu_extension, *shape, kv_cache_dtype, head_major=True)
    finally:
        monkeypatch.undo()
        for probe in probes:
            probe.cache_clear()
    assert native_build.compiler_flags() == flags


def test_unbuildable_library_means_the_torch_path(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder cannot be created
    cpu_extension.load.cache_clear()
    try:
        assert cpu_extension.load() is None
    finally:
        monkeypatch.undo()
        cpu_extension.load.cache_clear()
    assert cpu_extension.load() is not None


def test_an_unknown_march_is_named_in_the_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(native_build.MARCH_ENV, "not-a-cpu")
    cpu_extension.load.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=cpu_extension.__name__):
            assert cpu_extension.load() is None
    finally:
        monkeypatch.undo()
        cpu_extension.load.cache_clear()
    assert "using the torch paths: cc failed: " in caplog.text and "not-a-cpu" in caplog.text


@pytest.mark.parametrize("shape", [(1, 8), (5, 192), (130, 576), (3, 13)])
def test_native_per_token_quantization_matches_torch(native, shape):
    from kvpilot.kernels.quant.int8 import quantize_rows_int8

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    x[0] = 0.0  # an all-zero row keeps a tiny positive unit
    x[-1, :3] = torch.tensor([127.0, -63.5, 0.5])  # exact halves round to even, like torch
    expected_rows, expected_unit = quantize_rows_int8(x)
    rows, unit = native.quantize_rows_int8(x)
    assert torch.equal(unit, expected_unit) and torch.equal(rows, expected_rows)
    assert rows[-1, 0] == -128 and rows[-1, -1] == 127  # the anchor row
    int8_rows, int8_unit = native.quantize_rows_s8(x)  # oneDNN's form: int8, no anchor row
    assert int8_rows.dtype == torch.int8 and torch.equal(int8_unit, expected_unit)
    assert torch.equal(int8_rows.float(), expected_rows[:-1])


@pytest.mark.parametrize("shape", [(1, 8), (5, 192), (130, 576), (3, 13)])
def test_native_activation_split_matches_torch(native, shape):
    from kvpilot.kernels.quant.int8 import split_rows_int7

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1] + 1))
    x[0] = 0.0
    x[-1, :3] = torch.tensor([63.0, -31.5, 0.25])
    expected_rows, expected_unit = split_rows_int7(x)
    rows, unit = native.split_rows_int7(x)
    assert torch.equal(unit, expected_unit) and torch.equal(rows, expected_rows)
    assert rows[-1, 0] == -64 and rows[-1, -1] == 63  # the anchor row
    int8_rows, int8_unit = native.split_rows_s7(x)
    assert int8_rows.dtype == torch.int8 and torch.equal(int8_unit, expected_unit)
    assert torch.equal(int8_rows.float(), expected_rows[:-1])


@pytest.mark.parametrize("head_major", [True, False], ids=["head-major", "token-major"])
def test_native_int8_kv_write_matches_the_cache_quantizer(native, head_major):
    generator = torch.Generator().manual_seed(7)
    rows = torch.randn(6, 5, 64, generator=generator)  # K's heads as a slice of q/k rows: strided tokens
    x = rows[:, 2:] if head_major else rows[:, 2:].contiguous()
    x[2, 1] = 0.0  # an all-zero head keeps scale 0
    slots = torch.tensor([9, 0, 4, 17, 5, 11])
    expected, actual = (_int8_cache(torch.zeros(5, 4, 3, 64), head_major) for _ in range(2))
    expected.write(x, slots)
    native.write_kv_int8(x, actual, slots)
    assert torch.equal(actual.data, expected.data) and torch.equal(actual.scales, expected.scales)
    assert native.supports_int8_write(x, actual) and not native.supports_int8_write(x.bfloat16(), actual)


def test_the_build_module_imports_no_torch():
    """`kvpilot serve` starts the build before torch is imported: the module must not pull it in."""
    check = "import sys, kvpilot.kernels.native_build; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0
