"""GGUF Q4_0 / Q4_1 / Q8_0 blocks convert to kvpilot formats exactly, straight from the bytes."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from kvpilot.kernels.quant import Int4Weight, Int8Weight, from_gguf_blocks, from_gguf_tensor, quantize
from kvpilot.kernels.quant.loading import WeightQuantizer


@pytest.fixture(scope="module")
def reader(default_gguf) -> gguf.GGUFReader:
    return gguf.GGUFReader(default_gguf)


def _tensor(reader: gguf.GGUFReader, name: str) -> gguf.ReaderTensor:
    return next(t for t in reader.tensors if t.name == name)


def _gguf_reference(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("name", ["blk.0.attn_k.weight", "blk.3.ffn_down.weight", "blk.29.attn_q.weight"])
def test_q4_1_tensors_of_the_default_model_convert_exactly(reader, name):
    tensor = _tensor(reader, name)
    assert tensor.tensor_type == Q.Q4_1
    weight = from_gguf_tensor(tensor)
    assert isinstance(weight, Int4Weight) and weight.group_size == 32
    assert weight.nbytes == tensor.n_bytes  # 20 bytes per 32 weights, as in the file
    reference = _gguf_reference(tensor.data, tensor.tensor_type)
    assert torch.equal(weight.dequantize(), reference)
    x = torch.randn(3, weight.shape[1])
    assert torch.allclose(weight.linear(x), x @ reference.t(), rtol=1e-5, atol=1e-5)


def test_q8_0_embedding_rows_convert_exactly(reader):
    tensor = _tensor(reader, "token_embd.weight")
    assert tensor.tensor_type == Q.Q8_0
    raw = tensor.data[:2048]  # the first 2048 vocabulary rows of the real table
    weight = from_gguf_blocks(raw, Q.Q8_0, (2048, int(tensor.shape[0])))
    assert isinstance(weight, Int8Weight) and weight.group_size == 32
    reference = _gguf_reference(raw, Q.Q8_0)
    assert torch.equal(weight.dequantize(), reference)
    ids = torch.tensor([0, 1, 2047, 7])
    assert torch.equal(weight.embed(ids), reference[ids])


def test_q4_0_blocks_convert_exactly(reader):
    # the default model has no Q4_0 tensor: quantize one of its real weights with gguf's own Q4_0
    source = _tensor(reader, "blk.1.attn_v.weight")
    floats = gguf.quants.dequantize(source.data, source.tensor_type)
    raw = gguf.quants.quantize(floats, Q.Q4_0)
    weight = from_gguf_blocks(raw, Q.Q4_0, floats.shape)
    assert isinstance(weight, Int4Weight)
    assert torch.equal(weight.dequantize(), _gguf_reference(raw, Q.Q4_0))


def test_default_model_weights_take_a_quarter_of_float32_or_less(reader):
    quantized = [t for t in reader.tensors if t.tensor_type in (Q.Q4_1, Q.Q8_0)]
    assert len(quantized) == 211  # 210 linear weights + the (tied) embedding
    kvpilot_bytes = sum(from_gguf_tensor(t).nbytes for t in quantized)
    float32_bytes = sum(int(np.prod(t.shape)) * 4 for t in quantized)
    assert float32_bytes / kvpilot_bytes > 4.5


def test_unsupported_or_broken_blocks_are_rejected(reader):
    norm = _tensor(reader, "blk.0.attn_norm.weight")
    with pytest.raises(ValueError, match="F32"):
        from_gguf_blocks(norm.data, norm.tensor_type, (1, 576))
    tensor = _tensor(reader, "blk.0.attn_k.weight")
    with pytest.raises(ValueError, match="Q4_1"):
        from_gguf_blocks(tensor.data[:10], Q.Q4_1, (192, 576))


def test_int4_mode_keeps_q4_1_blocks_and_the_q8_0_embedding(reader):
    quantizer = WeightQuantizer("int4")
    linear = quantizer.linear(_tensor(reader, "blk.0.attn_q.weight"))
    embedding = quantizer.embedding(_tensor(reader, "token_embd.weight"))
    assert isinstance(linear, Int4Weight) and linear.group_size == 32
    assert isinstance(embedding, Int8Weight) and embedding.group_size == 32
    assert quantizer.summary() == "1 Q4_1 kept as int4, 1 Q8_0 embedding kept as int8"


@pytest.mark.parametrize(
    ("mode", "group_size", "kind"), [("int8", None, Int8Weight), ("int4", 64, Int4Weight)]
)
def test_other_formats_go_through_float_once(reader, mode, group_size, kind):
    tensor = _tensor(reader, "blk.0.attn_k.weight")
    quantizer = WeightQuantizer(mode, group_size)
    weight = quantizer.linear(tensor)
    assert isinstance(weight, kind) and weight.shape == (192, 576)
    expected = quantize(_gguf_reference(tensor.data, Q.Q4_1), mode, group_size)
    assert torch.equal(weight.dequantize(), expected.dequantize())
    assert quantizer.summary() == f"1 Q4_1 quantized to {mode}"


def test_mode_none_dequantizes_everything(reader):
    quantizer = WeightQuantizer("none")
    tensor = _tensor(reader, "blk.0.ffn_down.weight")
    weight = quantizer.linear(tensor)
    assert weight.dtype == torch.float32 and torch.equal(weight, _gguf_reference(tensor.data, Q.Q4_1))
    assert isinstance(quantizer.embedding(torch.ones(4, 2)), torch.Tensor)
    assert quantizer.summary() == "1 Q4_1 dequantized to float"


def test_quantizer_rejects_unknown_modes():
    with pytest.raises(ValueError, match="quantization"):
        WeightQuantizer("nf4")
    with pytest.raises(ValueError, match="quantization"):
        WeightQuantizer("int8", group_size=64)
