"""The GGUF header reader against gguf-py's GGUFReader, the reference: the same metadata and the
same tensors, on the default model and on a file holding every kind of value; clear errors on
files off the spec."""

import gguf
import numpy as np
import pytest
from kvpilot.serving.loader.errors import CheckpointError
from kvpilot.serving.loader.gguf_file import open_gguf
from kvpilot.serving.loader.gguf_header import SkippedStrings, read_gguf_header

Q = gguf.GGMLQuantizationType


def assert_reads_like_gguf_py(path, string_arrays=()):
    reference = gguf.GGUFReader(path)
    header = read_gguf_header(path, string_arrays)
    fields = {key: field for key, field in reference.fields.items() if not key.startswith("GGUF.")}
    assert list(header.metadata) == list(fields)
    for key, field in fields.items():
        ours, theirs = header.metadata[key], field.contents()
        if isinstance(ours, SkippedStrings):
            assert key not in string_arrays and len(ours) == len(theirs)
        else:
            assert ours == theirs and type(ours) is type(theirs), key
    assert list(header.tensors) == [tensor.name for tensor in reference.tensors]
    for theirs in reference.tensors:
        ours = header.tensors[theirs.name]
        assert ours.tensor_type == theirs.tensor_type
        assert ours.shape.tolist() == theirs.shape.tolist()
        assert (ours.n_elements, ours.n_bytes, ours.data_offset) == (
            theirs.n_elements,
            theirs.n_bytes,
            theirs.data_offset,
        )
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        assert np.array_equal(ours.data, theirs.data, equal_nan=True)
    return header


def test_the_default_model_reads_as_gguf_py_reads_it(default_gguf):
    header = assert_reads_like_gguf_py(default_gguf, {"tokenizer.ggml.tokens"})
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 49152
    assert header.metadata["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert len(header.metadata["tokenizer.ggml.merges"]) > 40000  # skipped: counted only


def write(path, alignment=None, tensors=True):
    writer = gguf.GGUFWriter(path, "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 255)
    writer.add_int8("t.i8", -128)
    writer.add_uint16("t.u16", 65535)
    writer.add_int16("t.i16", -32768)
    writer.add_uint32("t.u32", 2**32 - 1)
    writer.add_int32("t.i32", -(2**31))
    writer.add_float32("t.f32", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_uint64("t.u64", 2**64 - 1)
    writer.add_int64("t.i64", -(2**63))
    writer.add_float64("t.f64", 0.1)
    writer.add_string("t.string", "naïve — 日本語")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.strings", ["a", "", "ß"])
    if tensors:
        rng = np.random.default_rng(0)
        values = rng.standard_normal((4, 64)).astype(np.float32)
        writer.add_tensor("f32", values)
        writer.add_tensor("f16", values.astype(np.float16))
        writer.add_tensor("i32", np.arange(12, dtype=np.int32).reshape(3, 4))
        for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0):
            writer.add_tensor(qtype.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_kind_of_value_and_tensor_reads_as_gguf_py_reads_it(tmp_path, alignment):
    header = assert_reads_like_gguf_py(write(tmp_path / "all.gguf", alignment), {"t.strings"})
    assert header.metadata["t.strings"] == ["a", "", "ß"]
    assert header.metadata["t.u64"] == 2**64 - 1 and header.metadata["t.bool"] is True
    assert header.metadata["t.string"] == "naïve — 日本語"


def test_files_off_the_spec_are_clear_errors(tmp_path):
    good = write(tmp_path / "good.gguf").read_bytes()
    cases = {
        "magic.gguf": (b"GGUG" + good[4:], "no GGUF magic"),
        "version.gguf": (good[:4] + (1).to_bytes(4, "little") + good[8:], "GGUF version 1"),
        "truncated.gguf": (good[:200], "the file ends inside its header"),
        "short.gguf": (good[:-100], "tensor 'Q5_0' runs past the end of the file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name}: not a readable GGUF file \(.*{message}"):
            open_gguf(tmp_path / name)
    writer = gguf.GGUFWriter(tmp_path / "alignment.gguf", "llama")
    writer.add_uint32("general.alignment", 48)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"general\.alignment must be a power of two, got 48"):
        open_gguf(tmp_path / "alignment.gguf")
