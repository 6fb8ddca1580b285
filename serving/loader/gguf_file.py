"""GGUF files (llama.cpp): metadata -> ModelConfig, tensors by Hugging Face name, tokenizer.

llama.cpp's converter permutes the rows of attn_q/attn_k for its rotary layout; the permutation
is undone here exactly as transformers' GGUF loader does (`LlamaTensorProcessor`), as a row
index applied after the weight is built, so quantized blocks can keep their format.
"""

from pathlib import Path

import gguf
import torch
from kvpilot.kernels.quant.loading import WeightQuantizer
from kvpilot.serving.loader.errors import CheckpointError
from kvpilot.serving.loader.gguf_header import GGUFHeader, read_gguf_header
from kvpilot.serving.loader.weights import TensorRef, WeightBuilder
from kvpilot.serving.models.config import ARCHITECTURES, ModelConfig

# GGUF general.architecture -> the architecture it loads as.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}

LAYER_TENSORS = {  # Hugging Face name inside a layer -> GGUF name inside blk.N
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def open_gguf(path: Path) -> GGUFHeader:
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        return read_gguf_header(path)
    except Exception as exc:  # ValueError, struct and numpy errors on a file off the spec
        raise CheckpointError(path, f"not a readable GGUF file ({exc})") from None


def metadata(header: GGUFHeader, path: Path, key: str, default: object = ...):
    if key not in header.metadata:
        if default is ...:
            raise CheckpointError(path, f"missing metadata field {key!r}")
        return default
    return header.metadata[key]


def gguf_model_config(header: GGUFHeader, path: Path, dtype: str) -> ModelConfig:
    arch = metadata(header, path, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            path,
            f"metadata 'general.architecture': unsupported {arch!r}, supported: {sorted(GGUF_ARCHITECTURES)}",
        )
    architecture = GGUF_ARCHITECTURES[arch]

    def number(key: str, default: object = ...):
        value = metadata(header, path, f"{arch}.{key}", default)
        if not isinstance(value, int | float):
            raise CheckpointError(path, f"metadata '{arch}.{key}' must be a number, got {value!r}")
        return value

    scaling = metadata(header, path, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in header.tensors:
        raise CheckpointError(
            path, f"metadata '{arch}.rope.scaling.type': RoPE scaling {scaling!r} is not supported"
        )
    hidden_size = int(number("embedding_length"))
    num_heads = int(number("attention.head_count"))
    tokens = metadata(header, path, "tokenizer.ggml.tokens", [])
    flags = ARCHITECTURES[architecture]
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(number("vocab_size", len(tokens) or ...)),
        hidden_size=hidden_size,
        intermediate_size=int(number("feed_forward_length")),
        num_hidden_layers=int(number("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(number("attention.head_count_kv", num_heads)),
        head_dim=int(number("rope.dimension_count", hidden_size // num_heads)),
        rms_norm_eps=float(number("attention.layer_norm_rms_epsilon")),
        rope_theta=float(number("rope.freq_base", 10000.0)),
        rope_scaling=None,
        max_position_embeddings=int(number("context_length")),
        tie_word_embeddings="output.weight" not in header.tensors,
        qkv_bias=flags.qkv_bias,
        qk_norm=flags.qk_norm,
        dtype=dtype,
    )


def gguf_weights(header: GGUFHeader, path: Path, config: ModelConfig, quantizer: WeightQuantizer):
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(config.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}": f"blk.{i}.{name}" for hf, name in LAYER_TENSORS.items()}
    tensors = {hf: _ref(path, header.tensors[name]) for hf, name in names.items() if name in header.tensors}
    q_rows = rotary_row_order(config.num_attention_heads, config.head_dim)
    k_rows = rotary_row_order(config.num_key_value_heads, config.head_dim)
    permutations = {}
    for i in range(config.num_hidden_layers):
        permutations[f"model.layers.{i}.self_attn.q_proj.weight"] = q_rows
        permutations[f"model.layers.{i}.self_attn.k_proj.weight"] = k_rows
    return WeightBuilder(path, tensors, quantizer, permutations)


def rotary_row_order(num_heads: int, head_dim: int) -> torch.Tensor:
    """Row index undoing llama.cpp's q/k permutation: HF row (h, a, d) is GGUF row (h, d, a).

    Same as transformers' `w.reshape(n_head, dim, 2, ...).swapaxes(2, 1)` with dim = head_dim / 2.
    """
    return torch.arange(num_heads * head_dim).reshape(num_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def _ref(path: Path, tensor: gguf.ReaderTensor) -> TensorRef:
    return TensorRef(path, lambda: tensor)


def load_gguf_tokenizer(path: Path):
    """The embedded tokenizer, as AutoTokenizer builds it for a GGUF file (the fast tokenizer class),
    without AutoTokenizer's detour through the model config: gguf-py parses the whole file for
    that, 4-5 of a server's ~16 s start on our Zen 4 (the tokenizer alone: 0.5-0.7 s)."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise CheckpointError(path, f"cannot load the embedded tokenizer ({exc})") from None


def eos_token_ids(header: GGUFHeader, path: Path) -> set[int]:
    eos = metadata(header, path, "tokenizer.ggml.eos_token_id", None)
    return set() if eos is None else {int(eos)}


def chat_template(header: GGUFHeader, path: Path) -> str | None:
    return metadata(header, path, "tokenizer.chat_template", None)
