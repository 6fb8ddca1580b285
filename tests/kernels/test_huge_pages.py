"""Large CPU buffers in transparent huge pages (kernels/huge_pages.py)."""

import os
import sys
from pathlib import Path

import pytest
import torch
from kvpilot.kernels import huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mapping_bytes(tensor: torch.Tensor, field: str) -> int:
    """A field (`Rss`, `AnonHugePages`) of the mapping that holds the tensor's first byte
    (/proc/self/smaps)."""
    address, inside = tensor.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's header: start-end perms ...
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == f"{field}:":
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize(
    "shape, dtype", [((3, 5), torch.float32), ((4, 1024, 1024), torch.float32), ((8 << 20,), torch.int8)]
)
def test_zeros_is_torch_zeros(shape, dtype):
    tensor = huge_pages.zeros(shape, dtype)
    assert tensor.shape == shape and tensor.dtype == dtype
    assert torch.equal(tensor, torch.zeros(shape, dtype=dtype))


@pytest.mark.skipif(
    sys.platform != "linux" or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs Linux with transparent huge pages enabled",
)
def test_a_large_buffer_lives_in_huge_pages():
    tensor = huge_pages.zeros((16 << 20,), torch.uint8)
    assert mapping_bytes(tensor, "AnonHugePages") >= huge_pages.HUGE_PAGE_BYTES
    del tensor
    tensor = huge_pages.zeros((16 << 20,), torch.uint8)  # the mapping is freed with its tensor
    assert torch.count_nonzero(tensor) == 0


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_a_large_buffer_is_resident_before_its_first_write():
    """Its pages are faulted in at allocation, not by a decode step's first write to them."""
    tensor = huge_pages.zeros((16 << 20,), torch.uint8)
    assert mapping_bytes(tensor, "Rss") == tensor.numel()


@pytest.mark.parametrize("before, after", [(None, "1"), ("0", "0")])
def test_torch_allocations_ask_for_huge_pages_unless_the_user_said_otherwise(monkeypatch, before, after):
    if before is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", before)
    huge_pages.enable_for_torch_allocations()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == after
