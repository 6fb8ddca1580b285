"""What the model code needs to know about a checkpoint, and which architectures it runs."""

from dataclasses import dataclass

from kvpilot.serving.models.layers import RopeScaling


@dataclass(frozen=True)
class ArchitectureFlags:
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE


# Architecture name (config.json "architectures" / GGUF "general.architecture") -> flags.
ARCHITECTURES: dict[str, ArchitectureFlags] = {
    "LlamaForCausalLM": ArchitectureFlags(),
    "MistralForCausalLM": ArchitectureFlags(),
    "Qwen2ForCausalLM": ArchitectureFlags(qkv_bias=True),
    "Qwen3ForCausalLM": ArchitectureFlags(qk_norm=True),
}


@dataclass(frozen=True)
class ModelConfig:
    """A summary of the loaded model; the runner and the API read it, nobody mutates it."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: str
