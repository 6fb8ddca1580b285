"""`kvpilot bench quant`: per quantization mode, weight memory, KV blocks for a fixed budget,
perplexity on the shipped English text, and decode tokens/s at batch 1 and 32.

Every mode is built from the same checkpoint (opened once) with the loader's own
`WeightBuilder` + `WeightQuantizer`, so the weights are exactly what the server runs; the
perplexity pass prefills through the paged KV cache (chunk by chunk), so K/V quantization counts.
"""

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from kvpilot.kernels.attention import build_attention_metadata
from kvpilot.kernels.quant.kv_cache import allocate_kv_cache, kv_block_bytes
from kvpilot.kernels.quant.loading import WeightQuantizer
from kvpilot.serving.loader import gguf_file, hf
from kvpilot.serving.loader.weights import WeightBuilder
from kvpilot.serving.models.config import ModelConfig
from kvpilot.serving.models.llama import LlamaForCausalLM

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "essays.txt"


@dataclass(frozen=True)
class QuantMode:
    label: str
    quantization: str = "none"
    group_size: int | None = None  # int4 only; the engine uses 32
    kv_cache_dtype: str = "auto"


MODES = (
    QuantMode("none"),
    QuantMode("int8", "int8"),
    QuantMode("w8a8", "w8a8"),
    QuantMode("int4 g32", "int4", 32),
    QuantMode("int4 g64", "int4", 64),
    QuantMode("int4 g128", "int4", 128),
    QuantMode("fp8", "fp8"),
    QuantMode("kv int8", kv_cache_dtype="int8"),
    QuantMode("kv fp8", kv_cache_dtype="fp8"),
)


class Checkpoint:
    """A checkpoint opened once; `model(...)` builds it in any weight format."""

    def __init__(self, path: str | Path, dtype: str = "float32"):
        self.path = Path(path)
        self.dtype = dtype
        if self.path.suffix == ".gguf":
            self.header = gguf_file.open_gguf(self.path)
            self.config: ModelConfig = gguf_file.gguf_model_config(self.header, self.path, dtype)
        else:
            self.tensors = hf.tensor_refs(self.path)
            self.config = hf.model_config(self.path, dtype, has_lm_head="lm_head.weight" in self.tensors)

    def model(self, quantization: str = "none", group_size: int | None = None) -> LlamaForCausalLM:
        torch_dtype = getattr(torch, self.dtype)
        quantizer = WeightQuantizer(quantization, group_size, torch_dtype)
        if self.path.suffix == ".gguf":
            weights = gguf_file.gguf_weights(self.header, self.path, self.config, quantizer)
        else:
            weights = WeightBuilder(self.path, self.tensors, quantizer)
        return LlamaForCausalLM(self.config, weights, self.config.max_position_embeddings, torch_dtype)

    def tokenizer(self):
        if self.path.suffix == ".gguf":
            return gguf_file.load_gguf_tokenizer(self.path)
        return hf.load_tokenizer(self.path)


def allocate_kv_caches(
    model: LlamaForCausalLM, num_blocks: int, block_size: int, kv_cache_dtype: str
) -> list:
    """Per layer (K, V) as the model runner allocates them: tensors for "auto", else `KVCache`."""
    c, dtype = model.config, model.embed_tokens.dtype
    shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
    return [tuple(allocate_kv_cache(*shape, kv_cache_dtype, dtype) for _ in "kv") for _ in model.layers]


@torch.inference_mode()
def perplexity(
    model: LlamaForCausalLM, token_ids: list[int], kv_cache_dtype: str = "auto", chunk: int = 256
) -> float:
    """exp(mean negative log-likelihood) of token_ids[1:], prefilled `chunk` tokens at a time."""
    block_size = 16
    caches = allocate_kv_caches(model, -(-len(token_ids) // block_size), block_size, kv_cache_dtype)
    block_table = list(range(-(-len(token_ids) // block_size)))
    total = 0.0
    for start in range(0, len(token_ids) - 1, chunk):
        ids = token_ids[start : start + chunk]
        metadata = build_attention_metadata([len(ids)], [start], [block_table], block_size)
        hidden = model.forward(torch.tensor(ids), metadata, caches)
        targets = torch.tensor(token_ids[start + 1 : start + 1 + len(ids)])
        log_probs = torch.log_softmax(model.compute_logits(hidden[: len(targets)]).float(), dim=-1)
        total -= log_probs.gather(1, targets[:, None]).sum().item()
    return math.exp(total / (len(token_ids) - 1))


@torch.inference_mode()
def greedy_continuations(
    model: LlamaForCausalLM, prompts: list[list[int]], max_tokens: int, kv_cache_dtype: str = "auto"
) -> list[list[int]]:
    """Greedy tokens for every prompt, decoded together as one batch per step."""
    return _decode(model, prompts, max_tokens, kv_cache_dtype)[0]


def decode_tokens_per_second(
    model: LlamaForCausalLM, batch: int, kv_cache_dtype: str = "auto", steps: int = 16, prompt_len: int = 16
) -> float:
    prompts = [[(7 * i + j) % model.config.vocab_size for j in range(prompt_len)] for i in range(batch)]
    return batch * steps / _decode(model, prompts, steps, kv_cache_dtype)[1]


@torch.inference_mode()
def _decode(model, prompts: list[list[int]], max_tokens: int, kv_cache_dtype: str):
    """(greedy tokens per prompt, seconds spent in the decode steps after the prefill)."""
    block_size = 16
    blocks_per_seq = -(-(max(map(len, prompts)) + max_tokens) // block_size)
    caches = allocate_kv_caches(model, blocks_per_seq * len(prompts), block_size, kv_cache_dtype)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(prompts))]
    outputs: list[list[int]] = [[] for _ in prompts]
    step_ids, context = [list(p) for p in prompts], [0] * len(prompts)
    started = 0.0
    for step in range(max_tokens):
        if step == 1:
            started = time.perf_counter()
        metadata = build_attention_metadata(list(map(len, step_ids)), context, tables, block_size)
        hidden = model.forward(torch.tensor([t for ids in step_ids for t in ids]), metadata, caches)
        last = metadata.query_start_loc[1:] - 1
        next_ids = model.compute_logits(hidden[last]).argmax(dim=-1).tolist()
        for i, token in enumerate(next_ids):
            outputs[i].append(token)
            context[i] += len(step_ids[i])
        step_ids = [[token] for token in next_ids]
    return outputs, time.perf_counter() - started if max_tokens > 1 else 0.0


def kv_blocks_for_budget(
    model: LlamaForCausalLM, budget_bytes: int, kv_cache_dtype: str, block_size=16
) -> int:
    c = model.config
    per_block = kv_block_bytes(block_size, c.num_key_value_heads, c.head_dim, kv_cache_dtype, torch.float32)
    return budget_bytes // (c.num_hidden_layers * per_block)


def evaluation_tokens(tokenizer, num_tokens: int, text_path: Path = DATA_FILE) -> list[int]:
    ids = tokenizer(text_path.read_text(encoding="utf-8"))["input_ids"]
    if len(ids) < num_tokens:
        raise ValueError(f"--num-tokens: {text_path} has only {len(ids)} tokens")
    return ids[:num_tokens]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "quant", help="memory, KV capacity, perplexity and speed per quantization mode"
    )
    parser.add_argument("--model", default=None, help="checkpoint directory or .gguf file (default: SmolLM2)")
    parser.add_argument("--num-tokens", type=int, default=1024, help="perplexity text length in tokens")
    parser.add_argument(
        "--kv-budget-bytes", type=int, default=256 << 20, help="KV memory budget for the block count"
    )
    parser.add_argument(
        "--modes", default=",".join(m.label for m in MODES), help="comma-separated mode labels"
    )
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from kvpilot.serving.default_model import default_model_path

    modes = {m.label: m for m in MODES}
    chosen = [label.strip() for label in args.modes.split(",")]
    unknown = [label for label in chosen if label not in modes]
    if unknown:
        raise SystemExit(f"kvpilot bench quant: error: --modes: unknown {unknown}, choose from {list(modes)}")
    checkpoint = Checkpoint(args.model or default_model_path())
    tokens = evaluation_tokens(checkpoint.tokenizer(), args.num_tokens)
    budget_mib = args.kv_budget_bytes >> 20
    print(f"{checkpoint.path.name}: perplexity over {len(tokens)} tokens, KV budget {budget_mib} MiB")
    print(f"{'mode':<10} {'weights MiB':>11} {'KV blocks':>9} {'perplexity':>10} ", end="")
    print(f"{'tok/s b=1':>9} {'tok/s b=32':>10}")
    for label in chosen:
        mode = modes[label]
        model = checkpoint.model(mode.quantization, mode.group_size)
        row = (
            f"{label:<10} {model.weight_bytes / 2**20:>11.1f} "
            f"{kv_blocks_for_budget(model, args.kv_budget_bytes, mode.kv_cache_dtype):>9} "
            f"{perplexity(model, tokens, mode.kv_cache_dtype):>10.3f} "
            f"{decode_tokens_per_second(model, 1, mode.kv_cache_dtype):>9.1f} "
            f"{decode_tokens_per_second(model, 32, mode.kv_cache_dtype):>10.1f}"
        )
        print(row, flush=True)
    return 0
