"""Native CPU kernels (plain C, loaded with ctypes), compiled on first use and cached.

`paged_decode_attention` reads K/V straight from the paged cache: no gather copy and no padding
to the longest sequence, the two costs that dominate decode attention in torch on CPU. It needs
a C compiler (`cc`) at first use; without one `load()` returns None and callers use the torch path.
"""

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "paged_decode_attention.c"
# Reassociation lets the compiler vectorize the dot products; infinities keep their meaning.
FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
]
FLAGS += ["-fopenmp", "-shared", "-fPIC"]
logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvpilot" / "kernels"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None when it cannot be built here (no compiler, build error)."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    library = cache_dir() / f"paged_decode_attention-{digest}.so"
    if not library.exists():
        try:
            _build(library)
        except (OSError, subprocess.CalledProcessError) as error:  # no compiler, read-only cache, ...
            logger.warning("native CPU attention unavailable, using the torch path: %s", error)
            return None
    lib = ctypes.CDLL(str(library))
    lib.paged_decode_attention_f32.restype = ctypes.c_int
    return lib


def _build(library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        subprocess.run(["cc", *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True)
        os.replace(built, library)  # atomic: concurrent builders never see a partial file


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [D, num_heads, head_dim] float32, one query per sequence -> [D, num_heads, head_dim]."""
    lib = load()
    assert lib is not None, "call only when load() succeeded"
    q = q.contiguous()
    block_tables = block_tables.to(torch.int64).contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    status = lib.paged_decode_attention_f32(
        _ptr(q),
        _ptr(k_cache),
        _ptr(v_cache),
        _ptr(block_tables),
        _ptr(seq_lens),
        _ptr(out),
        ctypes.c_int64(num_seqs),
        ctypes.c_int64(num_heads),
        ctypes.c_int64(num_kv_heads),
        ctypes.c_int64(head_dim),
        ctypes.c_int64(block_size),
        ctypes.c_int64(block_tables.shape[1]),
        ctypes.c_float(scale),
        ctypes.c_int(torch.get_num_threads()),
    )
    if status != 0:
        raise RuntimeError(f"paged_decode_attention_f32 failed with status {status}")
    return out


def _ptr(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())
