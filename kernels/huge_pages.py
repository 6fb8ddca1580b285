"""Large CPU buffers in transparent huge pages (2 MiB), where Linux offers them.

Decode attention reads each sequence's KV blocks from scattered places of a cache of gigabytes;
with 4 KiB pages nearly every block costs TLB misses and page walks. A buffer of its own
anonymous mapping, advised `MADV_HUGEPAGE` before anything touches it (honoured when
`/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`), made the native decode
kernel 1.15-1.2x faster on a float32 cache, and a plain read of a large buffer 1.25x faster, on
our 2-core Xeon. (`torch.empty` + madvise is not enough: glibc serves allocations below its
mmap threshold, up to 32 MiB, from memory that earlier tensors already touched.) Elsewhere (no
Linux, THP `never`, CUDA, small buffers) `zeros` is `torch.zeros`.
"""

import math
import mmap
import os

import torch

HUGE_PAGE_BYTES = 2 << 20
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; Python < 3.13 lacks it


def enable_for_torch_allocations() -> None:
    """Asks torch's CPU allocator for huge pages on allocations of 2 MiB and more (its
    `THP_MEM_ALLOC_ENABLE`), so weights (oneDNN's packed copies included) read as fast as the KV
    cache does: batch-4 decode steps, which read every weight once, ran ~1.1x faster on our Xeon.
    torch reads the variable once, at its first such allocation: call this before loading weights.
    A value the user set is kept."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """`torch.zeros(shape)`, in huge pages when it is a CPU buffer of at least one huge page."""
    num_bytes = math.prod(shape) * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if torch.device(device).type != "cpu" or num_bytes < HUGE_PAGE_BYTES or advice is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    # private (a shared mapping would be shmem, which THP leaves alone) and anonymous: it reads
    # as zeros and no page of it is touched yet
    buffer = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE)
    buffer.madvise(advice)
    tensor = torch.frombuffer(buffer, dtype=dtype).view(shape)  # the tensor keeps the mapping alive
    _populate(buffer, tensor)
    return tensor


def _populate(buffer: mmap.mmap, tensor: torch.Tensor) -> None:
    """Faults every page in now, not on the first write of a decode step: a first touch costs a
    huge page's zeroing (and in a VM the host's backing of it), ~1 ms per 2 MiB on our Xeon
    guest, which was most of the KV-cache write's time in the first pass over a fresh cache."""
    try:
        buffer.madvise(MADV_POPULATE_WRITE)  # Linux >= 5.14: the kernel faults the range in
    except OSError:
        tensor.zero_()  # older kernels: touch every page ourselves
