"""Small real checkpoints that the tests build themselves (no model hub at run time)."""

from pathlib import Path

import torch
import transformers
from kvpilot.serving.default_model import default_model_path

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.2,  # peaked logits: greedy argmax is never a near-tie
)

ARCHITECTURES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            tie_word_embeddings=True,
        ),
    ),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32)),
}


def default_gguf_path() -> Path:
    return default_model_path()


def save_real_tokenizer(directory: Path) -> None:
    """The default model's real tokenizer and chat template, taken out of its GGUF file."""
    gguf = default_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)


def build_checkpoint(arch: str, directory: Path, tokenizer_dir: Path | None, seed: int = 0) -> Path:
    """A random-init model of `arch` saved with save_pretrained (safetensors), plus the tokenizer."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    vocab_size = 49152  # the real tokenizer's vocabulary
    config = config_cls(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **TINY, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer_dir is not None:
        for file in tokenizer_dir.iterdir():
            (directory / file.name).write_bytes(file.read_bytes())
    return directory
