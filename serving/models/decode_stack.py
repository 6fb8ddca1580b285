"""A decode step's whole decoder stack in one native call on CPU (csrc/decode_stack.c).

A layer is a dozen kernels; between two of them the Python path spends the interpreter's,
torch's and ctypes' time, and the other OpenMP threads wait. The native stack calls the same
kernels in the same order on the same values, so it gives the same bits. It takes models whose
every projection is a panel-packed weight without bias, all float32 (packed_float.py) or all
per-channel int8 (kernels/quant/panel_int8.py: modes int8 and w8a8), and no q/k norms, and
steps in which every sequence decodes one token into float32 or int8 caches; the model's Python
path runs the rest.
"""

from typing import TYPE_CHECKING

import torch
from kvpilot.kernels import cpu_extension
from kvpilot.kernels.attention import AttentionMetadata
from kvpilot.kernels.packed_float import PanelFloatWeight
from kvpilot.kernels.quant import Int8Weight
from kvpilot.kernels.quant.kv_cache import KVCache
from kvpilot.kernels.quant.panel_int8 import PanelInt8

if TYPE_CHECKING:  # llama.py imports this module
    from kvpilot.serving.models.llama import DecoderLayer, LlamaForCausalLM


# csrc/decode_stack.c's weight formats, one for every projection of the stack
FORMATS = {PanelFloatWeight: 0, PanelInt8: 1}


class NativeDecodeStack:
    def __init__(self, model: "LlamaForCausalLM", weights: list[torch.Tensor], weight_format: int):
        config, attention = model.config, model.layers[0].self_attn
        self.shape = (
            len(model.layers),
            config.hidden_size,
            config.intermediate_size,
            attention.num_heads,
            attention.num_kv_heads,
            attention.head_dim,
            weight_format,
        )
        self.weights = weights  # keeps alive what the pointers point to
        self.pointers = cpu_extension.pointers(weights)
        self.rotary_tables = (attention.rotary.cos, attention.rotary.signed_sin)
        self.eps, self.scale = model.norm.eps, attention.scale

    @classmethod
    def for_model(cls, model: "LlamaForCausalLM") -> "NativeDecodeStack | None":
        """The stack, or None unless it computes every layer as the model's Python path does
        (panel-packed weights imply that the native library built)."""
        if not model.layers:
            return None
        shapes = _projection_shapes(model)
        weights = [_layer_weights(layer, model.norm.eps, shapes) for layer in model.layers]
        rotary = model.layers[0].self_attn.rotary
        tables = (rotary.cos, rotary.signed_sin, model.norm.weight)
        if any(w is None for w in weights) or not all(map(_is_float_vector, tables)):
            return None
        if any(layer.self_attn.rotary is not rotary for layer in model.layers):
            return None
        formats = {weight_format for layer in weights for weight_format in layer[1]}
        if len(formats) != 1:
            return None
        tensors = [tensor for layer in weights for tensor in layer[0]] + [model.norm.weight]
        return cls(model, tensors, formats.pop())

    def __call__(
        self, x: torch.Tensor, metadata: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor | None:
        """The final norm of x [m, hidden] (the embedded tokens, then the residual stream: updated in
        place) through every layer; None, having done nothing, where the step or caches do not fit."""
        caches = _native_caches(kv_caches)
        if metadata.max_query_len != 1 or x.dtype != torch.float32 or caches is None:
            return None
        return cpu_extension.llama_decode(
            x.contiguous(),
            self.shape,
            self.pointers,
            *caches,
            _int64(metadata.positions),
            self.rotary_tables,
            _int64(metadata.slot_mapping),
            _int64(metadata.block_tables),
            _int64(metadata.seq_lens),
            self.eps,
            self.scale,
        )


def _projection_shapes(model: "LlamaForCausalLM") -> list[tuple[int, int]]:
    """[out, in] of q/k/v (merged), o, gate/up (merged) and down, as the C stack reads them."""
    config, attention = model.config, model.layers[0].self_attn
    hidden, inner = config.hidden_size, config.intermediate_size
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    return [
        ((heads + 2 * kv_heads) * dim, hidden),
        (hidden, heads * dim),
        (2 * inner, hidden),
        (hidden, inner),
    ]


def _layer_weights(
    layer: "DecoderLayer", eps: float, shapes: list[tuple[int, int]]
) -> tuple[list[torch.Tensor], list[int]] | None:
    """The layer's tensors in csrc/decode_stack.c's order and its projections' formats, or None
    where it has parts the native stack does not compute (q/k norms, biases, weights in other
    formats or shapes)."""
    attention, mlp = layer.self_attn, layer.mlp
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if attention.q_norm is not None or any(
        norm.eps != eps or not _is_float_vector(norm.weight) for norm in norms
    ):
        return None
    linears = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
    panels = [_panels(linear, shape) for linear, shape in zip(linears, shapes, strict=True)]
    if any(p is None for p in panels):
        return None
    (qkv, o, gate_up, down), formats = zip(*panels, strict=True)
    return [norms[0].weight, qkv, o, norms[1].weight, gate_up, down], list(formats)


def _panels(linear, shape: tuple[int, int]) -> tuple[torch.Tensor, int] | None:
    """(the panels, their format) of a `Linear` (or a `MergedLinear` that is one) with a
    panel-packed weight of this shape and no bias: float32 panels, or int8 ones."""
    parts = getattr(linear, "parts", [linear])
    if len(parts) != 1 or parts[0].bias is not None:
        return None
    weight = parts[0].weight
    if isinstance(weight, Int8Weight):
        weight = weight.packed  # a `PanelInt8` where the int8 panel kernel runs
    if type(weight) not in FORMATS or weight.shape != shape:
        return None
    return (weight.panels if isinstance(weight, PanelFloatWeight) else weight.buffer), FORMATS[type(weight)]


def _is_float_vector(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()


def _native_caches(kv_caches: list[tuple]) -> tuple[list[int | None], object] | None:
    """(per layer K's and V's values, then their scales: csrc/decode_stack.c's pointers; the values'
    layout) where every cache is a float32 tensor, or every one an int8 `KVCache`, on the CPU with
    head_dim contiguous and one layout for all (the kernels take one); else None."""
    caches = [cache for pair in kv_caches for cache in pair]
    if all(isinstance(cache, KVCache) and cache.kv_cache_dtype == "int8" for cache in caches):
        if not all(cache.scales.is_contiguous() for cache in caches):
            return None
        values = [cache.data for cache in caches]
        scales = [[k.scales.data_ptr(), v.scales.data_ptr()] for k, v in kv_caches]
    elif all(isinstance(cache, torch.Tensor) and cache.dtype == torch.float32 for cache in caches):
        values, scales = caches, [[None, None]] * len(kv_caches)
    else:
        return None
    first = values[0]
    if first.device.type != "cpu" or first.stride(3) != 1:
        return None
    if any(v.stride() != first.stride() or v.device != first.device for v in values):
        return None
    addresses = [v.data_ptr() for v in values]
    per_layer = [addresses[2 * i : 2 * i + 2] + scales[i] for i in range(len(kv_caches))]
    return [address for layer in per_layer for address in layer], cpu_extension.cache_layout(first)


def _int64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.int64).contiguous()
