"""Load a model for serving from a Hugging Face checkpoint directory or a GGUF file."""

from dataclasses import dataclass
from pathlib import Path

import torch
from kvpilot.kernels.quant.loading import WeightQuantizer
from kvpilot.serving.loader import hf
from kvpilot.serving.loader.errors import CheckpointError
from kvpilot.serving.loader.weights import WeightBuilder
from kvpilot.serving.models.config import ModelConfig
from kvpilot.serving.models.llama import LlamaForCausalLM

__all__ = ["TORCH_DTYPES", "CheckpointError", "LoadedModel", "load_model"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: object | None  # a transformers tokenizer
    chat_template: str | None
    eos_token_ids: set[int]
    quantization_summary: str


def load_model(path: str | Path, dtype: str = "float32", quantization: str = "none") -> LoadedModel:
    path = Path(path)
    torch_dtype = TORCH_DTYPES[dtype]
    quantizer = WeightQuantizer(quantization, dtype=torch_dtype)
    if path.is_file() or path.suffix == ".gguf":
        from kvpilot.serving.loader.gguf_file import load_gguf

        return load_gguf(path, dtype, quantizer)
    if not path.is_dir():
        raise CheckpointError(path, "no such checkpoint directory or .gguf file")
    tensors = hf.tensor_loaders(path)
    config = hf.model_config(path, dtype, has_lm_head="lm_head.weight" in tensors)
    weights = WeightBuilder(path, tensors, quantizer)
    model = LlamaForCausalLM(config, weights, config.max_position_embeddings, torch_dtype)
    tokenizer = hf.load_tokenizer(path)
    eos = hf.eos_token_ids(path)
    if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = {tokenizer.eos_token_id}
    chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return LoadedModel(model, config, tokenizer, chat_template, eos, quantizer.summary())
