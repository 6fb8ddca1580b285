"""A GGUF file's header, read with struct: its metadata, then its tensor table (the GGUF spec).

gguf-py's GGUFReader makes a numpy view of every element of every metadata array: 3-4 s for
the default model's 49k-entry vocabulary and merge table, the larger part of a server's start
(our Zen 4). The same header read here takes ~40 ms. Tensors come out as gguf-py's
`ReaderTensor` (views into one read-only memory map, shaped as GGUFReader shapes them), so the
weight loaders and gguf-py's dequantization take them unchanged.
"""

import struct
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

VERSIONS = (2, 3)
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

Q = gguf.GGMLQuantizationType
# Tensor types GGUFReader hands out as values; the others as bytes, a row of blocks per row.
VALUE_TYPES = {
    Q.F16: np.float16,
    Q.F32: np.float32,
    Q.F64: np.float64,
    Q.I8: np.int8,
    Q.I16: np.int16,
    Q.I32: np.int32,
    Q.I64: np.int64,
}


@dataclass(frozen=True)
class SkippedStrings:
    """An array of strings not asked for: only its length was read."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: dict[str, gguf.ReaderTensor]  # by GGUF name, in file order


class _Cursor:
    def __init__(self, buffer: memoryview):
        self.buffer, self.pos = buffer, 0

    def take(self, fmt: str) -> tuple:
        fmt = "<" + fmt
        try:
            values = struct.unpack_from(fmt, self.buffer, self.pos)
        except struct.error:
            raise ValueError(f"the file ends inside its header (at byte {self.pos})") from None
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.take("Q")
        self.pos += length
        return bytes(self.buffer[self.pos - length : self.pos]).decode("utf-8")

    def value(self, value_type: int, keep_strings: bool) -> Any:
        if value_type in SCALARS:
            return self.take(SCALARS[value_type])[0]
        if value_type == STRING:
            return self.string()
        if value_type != ARRAY:
            raise ValueError(f"metadata value type {value_type} is not in the GGUF spec")
        item_type, count = self.take("IQ")
        if item_type in SCALARS:
            return list(self.take(f"{count}{SCALARS[item_type]}"))
        if item_type != STRING:
            raise ValueError(f"metadata array of type {item_type} is not supported")
        if keep_strings:
            return [self.string() for _ in range(count)]
        for _ in range(count):
            self.pos += 8 + self.take("Q")[0]
        return SkippedStrings(count)


def read_gguf_header(path: Path, string_arrays: Container[str] = ()) -> GGUFHeader:
    """Arrays of strings are read only for the keys in `string_arrays`; ValueError on a file that
    does not follow the spec."""
    data = np.memmap(path, mode="r")
    cursor = _Cursor(memoryview(data))
    magic, version, tensor_count, kv_count = cursor.take("4sIQQ")
    if magic != b"GGUF":
        raise ValueError("no GGUF magic")
    if version not in VERSIONS:
        raise ValueError(f"GGUF version {version} (little-endian versions {VERSIONS} are read)")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        (value_type,) = cursor.take("I")
        metadata[key] = cursor.value(value_type, key in string_arrays)
    table = []
    for _ in range(tensor_count):
        name = cursor.string()
        (dims,) = cursor.take("I")
        shape = cursor.take(f"{dims}Q")
        tensor_type, offset = cursor.take("IQ")
        table.append((name, shape, Q(tensor_type), offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment must be a power of two, got {alignment!r}")
    start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, shape, tensor_type, offset in table:
        if name in tensors:
            raise ValueError(f"tensor {name!r} appears twice")
        tensors[name] = _tensor(data, start + offset, name, shape, tensor_type)
    return GGUFHeader(metadata, tensors)


def _tensor(data: np.memmap, begin: int, name: str, shape: tuple[int, ...], tensor_type) -> gguf.ReaderTensor:
    elements = int(np.prod(shape))
    block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    nbytes = elements * block_bytes // block
    if begin + nbytes > len(data):
        raise ValueError(f"tensor {name!r} runs past the end of the file")
    rows = tuple(reversed(shape))  # GGML lists dimensions innermost first
    if tensor_type in VALUE_TYPES:
        values = data[begin : begin + nbytes].view(VALUE_TYPES[tensor_type]).reshape(rows)
    else:
        values = data[begin : begin + nbytes].reshape(gguf.quant_shape_to_byte_shape(rows, tensor_type))
    dims = np.array(shape, np.uint64)
    return gguf.ReaderTensor(name, tensor_type, dims, elements, nbytes, begin, values, field=None)
