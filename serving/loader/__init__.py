"""Load a model for serving from a Hugging Face checkpoint directory or a GGUF file."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from kvpilot.kernels.quant.loading import WeightQuantizer, check_checkpoint_config
from kvpilot.serving.loader import gguf_file, hf
from kvpilot.serving.loader.errors import CheckpointError
from kvpilot.serving.loader.weights import WeightBuilder
from kvpilot.serving.models.config import ModelConfig
from kvpilot.serving.models.llama import LlamaForCausalLM
from kvpilot.serving.validation import InvalidParameter

__all__ = [
    "TORCH_DTYPES",
    "CheckpointError",
    "LoadedModel",
    "checkpoint_dtype",
    "load_model",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF_DTYPES = ("bfloat16", "float16")


def resolve_dtype(
    requested: str, checkpoint: str | None, device_type: str, bf16_supported: bool = True
) -> str:
    """`--dtype auto`: float32 on CPU; on CUDA the checkpoint's own half dtype, and for a float32
    (or unknown, e.g. GGUF) checkpoint bfloat16 where the GPU has it, else float16. Anything
    else is taken as given."""
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "float32"
    if checkpoint in HALF_DTYPES and (checkpoint != "bfloat16" or bf16_supported):
        return checkpoint
    return "bfloat16" if bf16_supported else "float16"


def checkpoint_dtype(path: str | Path) -> str | None:
    """The dtype a checkpoint directory's config.json names (`dtype`, or `torch_dtype` before
    transformers 5); None for a GGUF file or when it names none."""
    path = Path(path)
    if not path.is_dir() or not (path / hf.CONFIG).is_file():
        return None
    raw = hf.read_json(path / hf.CONFIG)
    named = raw.get("dtype") or raw.get("torch_dtype")
    return named if named in TORCH_DTYPES else None


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: object | None  # a transformers tokenizer; None when the checkpoint has none
    chat_template: str | None
    eos_token_ids: set[int]
    quantization_summary: str  # what happened to the weights, e.g. "210 Q4_1 dequantized to float"


def load_model(
    path: str | Path, dtype: str = "float32", quantization: str = "none", device: torch.device | str = "cpu"
) -> LoadedModel:
    """`path`: a checkpoint directory or a .gguf file. Weights become `quantization`'s format, on `device`."""
    path = Path(path)
    if dtype not in TORCH_DTYPES:
        raise InvalidParameter("dtype", f"must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
    torch_dtype = TORCH_DTYPES[dtype]
    quantizer = WeightQuantizer(quantization, dtype=torch_dtype, device=device)
    if path.suffix == ".gguf" or path.is_file():
        config, weights, tokenizer, chat_template, eos = _read_gguf(path, dtype, quantizer)
    elif path.is_dir():
        config, weights, tokenizer, chat_template, eos = _read_checkpoint_dir(path, dtype, quantizer)
    else:
        raise CheckpointError(path, "no such checkpoint directory or .gguf file")
    if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = {tokenizer.eos_token_id}
    model = LlamaForCausalLM(config, weights, config.max_position_embeddings, torch_dtype, device)
    summary = quantizer.summary()
    mib = model.weight_bytes / 2**20
    logger.info("weights (--quantization %s): %s; %.1f MiB", quantization, summary, mib)
    return LoadedModel(model, config, tokenizer, chat_template, eos, summary)


def _read_checkpoint_dir(path: Path, dtype: str, quantizer: WeightQuantizer):
    check_checkpoint_config(hf.read_json(path / hf.CONFIG), quantizer.mode, path / hf.CONFIG)
    tensors = hf.tensor_refs(path)
    config = hf.model_config(path, dtype, has_lm_head="lm_head.weight" in tensors)
    tokenizer = hf.load_tokenizer(path)
    chat_template = getattr(tokenizer, "chat_template", None)
    return config, WeightBuilder(path, tensors, quantizer), tokenizer, chat_template, hf.eos_token_ids(path)


def _read_gguf(path: Path, dtype: str, quantizer: WeightQuantizer):
    header = gguf_file.open_gguf(path)
    config = gguf_file.gguf_model_config(header, path, dtype)
    weights = gguf_file.gguf_weights(header, path, config, quantizer)
    has_tokenizer = "tokenizer.ggml.tokens" in header.metadata
    tokenizer = gguf_file.load_gguf_tokenizer(path) if has_tokenizer else None
    chat_template = gguf_file.chat_template(header, path)
    return config, weights, tokenizer, chat_template, gguf_file.eos_token_ids(header, path)
