"""Native CPU kernels (plain C, loaded with ctypes), compiled on first use and cached.

- `paged_decode_attention` reads K/V (float32, or int8 with per-token-per-head scales) straight
  from the paged cache: no gather copy, no dequantized copy and no padding to the longest
  sequence, the costs that dominate decode attention in torch on CPU.
- `quantize_rows_int8` / `split_rows_int7` quantize activations per token for fbgemm's int8
  linears (floats with an anchor row), `quantize_rows_s8` / `split_rows_s7` the same integers as
  int8 for oneDNN's, and
  `write_kv_int8` quantizes and scatters new K/V into an int8 cache, each in one call.
- `sgemm_packed` multiplies float32 rows by a weight packed in panels of 16 outputs (AVX2 + FMA
  builds; see kernels/packed_float.py), `int8_gemm_packed` quantizes them per token and multiplies
  by int8 panels (AVX-512 VNNI and AVX2 builds; see kernels/quant/panel_int8.py).
- `llama_decode` runs a whole Llama decoder stack over a decode step, calling the kernels above
  from C (see serving/models/decode_stack.py).

They need a C compiler (`cc`) at first use (kernels/native_build.py); without one `load()`
returns None and callers use their torch paths. They are built for this CPU (`-march=native`)
unless KVPILOT_MARCH names another gcc `-march` target: `znver2` runs the AVX2 build on an AVX-512
machine, `x86-64` the portable C paths.
"""

import ctypes
import functools
import logging
import subprocess

import torch
from kvpilot.kernels import native_build
from kvpilot.kernels.quant.kv_cache import KVCache

logger = logging.getLogger(__name__)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None when it cannot be built here (no compiler, build error)."""
    try:
        library = native_build.ensure_built()
    except (OSError, subprocess.CalledProcessError) as error:  # no compiler, read-only cache, ...
        logger.warning("native CPU kernels unavailable, using the torch paths: %s", _reason(error))
        return None
    lib = ctypes.CDLL(str(library))
    lib.paged_decode_attention_f32.restype = ctypes.c_int
    lib.paged_decode_attention_i8.restype = ctypes.c_int
    lib.quantize_rows_int8.restype = None
    lib.split_rows_int7.restype = None
    lib.quantize_rows_s8.restype = None
    lib.split_rows_s7.restype = None
    lib.write_kv_int8.restype = None
    for name in ("write_kv_f32", "rms_norm_f32", "add_rms_norm_f32", "silu_mul_f32", "argmax_f32"):
        getattr(lib, name).restype = None
    lib.sgemm_packed.restype = ctypes.c_int
    lib.int8_gemm_packed.restype = ctypes.c_int
    lib.int8_panel_instruction.restype = ctypes.c_char_p
    lib.rotary_f32.restype = ctypes.c_int
    lib.llama_decode_f32.restype = ctypes.c_int
    return lib


def _reason(error: Exception) -> str:
    """The compiler's first error line where it ran (e.g. an unknown KVPILOT_MARCH), else the error."""
    stderr = getattr(error, "stderr", None) or b""
    errors = [line.strip() for line in stderr.decode(errors="replace").splitlines() if "error" in line]
    return f"cc failed: {errors[0]}" if errors else str(error)


def cache_layout(values: torch.Tensor) -> ctypes.Array:
    """The kernels' view of a [num_blocks, block_size, heads, head_dim] cache (csrc/cache_layout.h):
    int64[4] of block_size and the element strides of a block, a token, a head."""
    return (ctypes.c_int64 * 4)(values.shape[1], *values.stride()[:3])


def _native_layout(cache: torch.Tensor | KVCache) -> bool:
    """head_dim contiguous (the values), and an int8 cache's scales contiguous."""
    if isinstance(cache, KVCache):
        return cache.data.stride(3) == 1 and (cache.scales is None or cache.scales.is_contiguous())
    return cache.stride(3) == 1


def supports(q: torch.Tensor, k_cache) -> bool:
    """float32 queries over a float32 or int8 cache (see `_native_layout`), and the library built."""
    if q.dtype != torch.float32:
        return False
    if isinstance(k_cache, KVCache):
        is_native = k_cache.kv_cache_dtype == "int8"
    else:
        is_native = k_cache.dtype == torch.float32
    return is_native and _native_layout(k_cache) and load() is not None


def supports_int8_write(x: torch.Tensor, cache: KVCache) -> bool:
    native = cache.kv_cache_dtype == "int8" and _native_layout(cache)
    return x.dtype == torch.float32 and native and load() is not None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor | KVCache,
    v_cache: torch.Tensor | KVCache,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [D, num_heads, head_dim] float32, one query per sequence -> [D, num_heads, head_dim].

    The caches are float32 tensors or int8 `KVCache`s (see `supports`)."""
    lib = load()
    assert lib is not None, "call only when load() succeeded"
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:  # each sequence's heads contiguous
        q = q.contiguous()
    block_tables = block_tables.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty(num_seqs, num_heads, head_dim)
    if isinstance(k_cache, KVCache):
        kernel, values = lib.paged_decode_attention_i8, (k_cache.data, v_cache.data)
        caches = [*map(_ptr, values), _ptr(k_cache.scales), _ptr(v_cache.scales)]
    else:
        kernel, values = lib.paged_decode_attention_f32, (k_cache, v_cache)
        caches = [*map(_ptr, values)]
    if values[0].stride() != values[1].stride():
        raise ValueError("k_cache, v_cache: the kernel reads both with one layout; their strides differ")
    layout = cache_layout(values[0])
    status = kernel(
        _ptr(q),
        ctypes.c_int64(q.stride(0)),
        *caches,
        _ptr(block_tables),
        _ptr(seq_lens),
        _ptr(out),
        ctypes.c_int64(num_seqs),
        ctypes.c_int64(num_heads),
        ctypes.c_int64(num_kv_heads),
        ctypes.c_int64(head_dim),
        layout,
        ctypes.c_int64(block_tables.shape[1]),
        ctypes.c_float(scale),
        ctypes.c_int(torch.get_num_threads()),
        None,  # nothing to ask for when done
    )
    if status != 0:
        raise RuntimeError(f"native paged decode attention failed with status {status}")
    return out


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float32 -> (rows [T + 1, K]: round(x / unit) then fbgemm's anchor row, unit [T, 1])."""
    return _rows_and_units(x, "quantize_rows_int8", 1)


def _rows_and_units(
    x: torch.Tensor, kernel: str, parts: int, anchor: int = 1, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a per-token activation kernel that writes `parts` integer rows per token (+ an anchor row)."""
    lib = load()
    assert lib is not None, "call only when load() succeeded"
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty(parts * rows + anchor, cols, dtype=dtype)
    unit = torch.empty(rows, 1)
    args = (ctypes.c_int64(rows), ctypes.c_int64(cols), ctypes.c_int64(x.stride(0)))
    getattr(lib, kernel)(_ptr(x), *args, _ptr(out), _ptr(unit), ctypes.c_int(torch.get_num_threads()))
    return out, unit


def split_rows_int7(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float32 -> (rows [2T + 1, K]: hi parts, lo parts, fbgemm's anchor row; unit [T, 1])."""
    return _rows_and_units(x, "split_rows_int7", 2)


def quantize_rows_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float32 -> (int8 rows [T, K]: round(x / unit), unit [T, 1]); no anchor row."""
    return _rows_and_units(x, "quantize_rows_s8", 1, anchor=0, dtype=torch.int8)


def split_rows_s7(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float32 -> (int8 rows [2T, K]: hi parts then lo parts, unit [T, 1]); no anchor row."""
    return _rows_and_units(x, "split_rows_s7", 2, anchor=0, dtype=torch.int8)


def write_kv_int8(x: torch.Tensor, cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Quantize x [T, num_kv_heads, head_dim] (float32) into an int8 cache at its slots."""
    lib = load()
    assert lib is not None, "call only when load() succeeded"
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:  # each token's heads contiguous
        x = x.contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    tokens, heads, head_dim = x.shape
    shape = _int64s(x.stride(0), tokens, heads, head_dim)
    layout = cache_layout(cache.data)
    lib.write_kv_int8(_ptr(x), *shape, _ptr(slots), layout, _ptr(cache.data), _ptr(cache.scales))


def supports_f32_write(x: torch.Tensor, cache: torch.Tensor | KVCache) -> bool:
    """float32 rows (each token's heads contiguous) into a float32 cache with head_dim contiguous,
    library built."""
    if not isinstance(cache, torch.Tensor) or cache.dtype != torch.float32 or not _native_layout(cache):
        return False
    dense_rows = x.stride(2) == 1 and x.stride(1) == x.shape[2]
    return x.dtype == torch.float32 and dense_rows and load() is not None


def write_kv_f32(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, num_kv_heads, head_dim] float32 (see `supports_f32_write`) into their cache slots."""
    lib = load()
    assert lib is not None, "call only when load() succeeded"
    slots = slot_mapping.to(torch.int64).contiguous()
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache, v_cache: the kernel writes both with one layout; their strides differ")
    tokens, heads, head_dim = k.shape
    sizes = _int64s(tokens, heads, head_dim)
    strides = _int64s(k.stride(0), v.stride(0))
    layout = cache_layout(k_cache)
    caches = (_ptr(k_cache), _ptr(v_cache))
    lib.write_kv_f32(_ptr(k), _ptr(v), *sizes, *strides, _ptr(slots), layout, *caches)


def supports_rows(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """2-D float32 CPU rows with unit column stride (and a contiguous float32 weight), library built."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1:
        return False
    if weight is not None and (weight.dtype != torch.float32 or not weight.is_contiguous()):
        return False
    return load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] (see `supports_rows`) -> its RMSNorm times weight, a new [T, H] tensor."""
    out = torch.empty(x.shape)
    rows, cols = _int64s(*x.shape)
    load().rms_norm_f32(
        _ptr(x), *_int64s(x.stride(0)), _ptr(weight), rows, cols, ctypes.c_float(eps), _ptr(out), _threads()
    )
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place, then x's RMSNorm times weight (a new tensor); both [T, H] rows."""
    out = torch.empty(x.shape)
    rows, cols = _int64s(*x.shape)
    strides = _int64s(x.stride(0), delta.stride(0))
    load().add_rms_norm_f32(
        _ptr(x),
        strides[0],
        _ptr(delta),
        strides[1],
        _ptr(weight),
        rows,
        cols,
        ctypes.c_float(eps),
        _ptr(out),
        _threads(),
    )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2n] contiguous float32 -> silu(gate) * up, [T, n]."""
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2)
    load().silu_mul_f32(_ptr(gate_up), *_int64s(rows, width // 2), _ptr(out), _threads())
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, n] (see `supports_rows`) -> int64 [T]: each row's first maximum (its first NaN if any)."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    load().argmax_f32(_ptr(x), *_int64s(x.stride(0), *x.shape), _ptr(out), _threads())
    return out


def supports_rotary(x: torch.Tensor, table: torch.Tensor) -> bool:
    """x [T, heads, dim] float32 CPU with dim contiguous, a contiguous float32 table, library built."""
    rows = x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 3 and x.stride(2) == 1
    return rows and table.dtype == torch.float32 and table.is_contiguous() and load() is not None


def rotary(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
) -> torch.Tensor:
    """x [T, heads, dim] (see `supports_rotary`) rotated by positions [T]: a new [T, heads, dim]."""
    tokens, heads, dim = x.shape
    out = torch.empty(tokens, heads, dim)
    positions = positions.to(torch.int64).contiguous()
    strides = _int64s(x.stride(0), x.stride(1))
    tables = (_ptr(positions), _ptr(cos), _ptr(signed_sin), *_int64s(cos.shape[0]))
    sizes = _int64s(tokens, heads, dim)
    if load().rotary_f32(_ptr(x), *strides, *tables, *sizes, _ptr(out), _threads()) != 0:
        raise IndexError(f"positions: each must be in [0, {cos.shape[0]}), the rotary tables' rows")
    return out


@functools.cache
def supports_packed_sgemm() -> bool:
    """The library built, with the panel GEMM compiled in (AVX2 + FMA): a 1 x 1 product runs."""
    if load() is None:
        return False
    panels, out = torch.zeros(1, 1, 16), torch.empty(1, 1)
    panels[0, 0, 0] = 3.0
    status = _gemm_status("sgemm_packed", torch.full((1, 1), 2.0), panels, 1, None, out)
    return status == 0 and out.item() == 6.0


@functools.cache
def supports_int8_panels() -> bool:
    """The library built, with the int8 panel GEMM compiled in (AVX-512 VNNI or AVX2): a 1 x 1
    product runs."""
    from kvpilot.kernels.quant.panel_int8 import PanelInt8

    if load() is None:
        return False
    weight = PanelInt8.pack(torch.full((1, 1), 3, dtype=torch.int8), torch.ones(1), int8_activations=True)
    out = torch.empty(1, 1)
    status = _gemm_status("int8_gemm_packed", torch.full((1, 1), 2.0), weight.buffer, 1, None, out)
    return status == 0 and out.item() == 6.0


def int8_panel_instruction() -> str | None:
    """What the int8 panels multiply with in this build: "vpdpbusd" (AVX-512 VNNI), "vpmaddwd"
    (AVX2), or None where they do not run."""
    return load().int8_panel_instruction().decode() if supports_int8_panels() else None


def sgemm_packed(
    x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, in] float32 @ W^T (+ bias) -> [T, out_features]; W as [panels, in, 16] (packed_float.py)."""
    return _panel_gemm("sgemm_packed", x, panels, out_features, bias)


def int8_gemm_packed(
    x: torch.Tensor, buffer: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, in] float32 quantized per token, times an int8 weight (+ bias) -> [T, out_features];
    the weight (and how x is quantized) as kernels/quant/panel_int8.py packs it."""
    return _panel_gemm("int8_gemm_packed", x, buffer, out_features, bias)


def _panel_gemm(
    kernel: str, x: torch.Tensor, weight: torch.Tensor, out_features: int, bias: torch.Tensor | None
) -> torch.Tensor:
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None:  # the kernels read whole panels of it
        bias = torch.nn.functional.pad(bias.float(), (0, -out_features % 16)).contiguous()
    out = torch.empty(x.shape[0], out_features)
    status = _gemm_status(kernel, x, weight, out_features, bias, out)
    if status != 0:
        reason = "not compiled for this CPU" if status == -1 else "out of memory or too many inputs"
        raise RuntimeError(f"native {kernel} failed with status {status} ({reason})")
    return out


def _gemm_status(
    kernel: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> int:
    rows, in_features = x.shape
    x_shape = _int64s(rows, in_features, x.stride(0))
    bias_ptr = None if bias is None else _ptr(bias)
    (n,) = _int64s(out_features)  # out's row stride too: out is [rows, out_features]
    return getattr(load(), kernel)(_ptr(x), *x_shape, _ptr(weight), n, bias_ptr, _ptr(out), n, _threads())


def pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    """The tensors' data pointers as a C array (void *[])."""
    return (ctypes.c_void_p * len(tensors))(*(tensor.data_ptr() for tensor in tensors))


def llama_decode(
    x: torch.Tensor,
    shape: tuple[int, ...],
    weights: ctypes.Array,
    caches: list[int | None],
    layout: ctypes.Array,
    positions: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    eps: float,
    scale: float,
) -> torch.Tensor:
    """x [m, hidden] float32 (updated in place: the residual stream) through a decoder stack, one
    decode token per row; returns the final norm [m, hidden]. `shape`, `weights` and `caches` as
    csrc/decode_stack.c lays them out (`caches` as addresses, None for a float cache's scales);
    `tables` RoPE's cos and signed sin; int64 metadata."""
    rows, hidden = x.shape
    out = torch.empty(rows, hidden)
    cos, signed_sin = tables
    status = load().llama_decode_f32(
        _ptr(x),
        ctypes.c_int64(rows),
        (ctypes.c_int64 * len(shape))(*shape),
        weights,
        (ctypes.c_void_p * len(caches))(*caches),
        layout,
        _ptr(positions),
        _ptr(cos),
        _ptr(signed_sin),
        ctypes.c_int64(cos.shape[0]),
        _ptr(slots),
        _ptr(block_tables),
        ctypes.c_int64(block_tables.shape[1]),
        _ptr(seq_lens),
        ctypes.c_float(eps),
        ctypes.c_float(scale),
        _ptr(out),
        _threads(),
    )
    if status == -1:
        raise IndexError(f"positions: each must be in [0, {cos.shape[0]}), the rotary tables' rows")
    if status != 0:
        raise RuntimeError(
            f"native decode stack failed with status {status} (out of memory or a shape it cannot take)"
        )
    return out


def _int64s(*values: int) -> tuple[ctypes.c_int64, ...]:
    return tuple(ctypes.c_int64(value) for value in values)


def _threads() -> ctypes.c_int:
    return ctypes.c_int(torch.get_num_threads())


def _ptr(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())
