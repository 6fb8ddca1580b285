"""The systems kvpilot is measured against, each run on the same workload requests.

- `transformers` `generate`, one request at a time (what a user without a serving engine does);
- `transformers` `generate` on static, left-padded batches, each running to its longest request;
- llama.cpp through `llama-cpp-python`'s low-level batch API, many sequences at once
  (only when that optional package is installed).
Every request generates exactly its `output_len` tokens (EOS is suppressed until then), so
output token counts match kvpilot's.
"""

import functools
import importlib.util
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from kvpilot.serving.bench.report import SystemResult
from kvpilot.serving.bench.workload import WorkloadRequest


def load_hf_model(model: str | Path):
    """A float32 transformers model for a checkpoint directory or a .gguf file (dequantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model)
    kwargs = {"dtype": torch.float32}
    if path.suffix == ".gguf":
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return hf_model.eval()


def run_hf_sequential(hf_model, requests: list[WorkloadRequest]) -> SystemResult:
    """`generate` one request at a time; throughput does not depend on how many requests run."""
    import torch

    output_tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for request in requests:
            input_ids = torch.tensor([request.prompt_token_ids])
            out = hf_model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                **_exact_length_kwargs(hf_model, request.output_len),
            )
            output_tokens += _count_generated(out.shape[1] - input_ids.shape[1], request.output_len)
    return SystemResult("fp32", len(requests), output_tokens, time.perf_counter() - start)


def run_hf_static_batch(hf_model, requests: list[WorkloadRequest], batch_size: int = 32) -> SystemResult:
    """`generate` on left-padded batches of `batch_size` in workload order.

    A batch runs until its longest request is done; only each request's own `output_len`
    tokens count as output (the rest is the padding waste static batching pays for).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    pad_id = _pad_token_id(hf_model)
    output_tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(requests), batch_size):
            batch = requests[first : first + batch_size]
            width = max(r.prompt_len for r in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, request in enumerate(batch):
                input_ids[row, width - request.prompt_len :] = torch.tensor(request.prompt_token_ids)
                attention_mask[row, width - request.prompt_len :] = 1
            longest = max(r.output_len for r in batch)
            out = hf_model.generate(
                input_ids, attention_mask=attention_mask, **_exact_length_kwargs(hf_model, longest)
            )
            _count_generated(out.shape[1] - width, longest)
            output_tokens += sum(r.output_len for r in batch)
    return SystemResult("fp32", len(requests), output_tokens, time.perf_counter() - start)


def _exact_length_kwargs(hf_model, num_tokens: int) -> dict:
    return dict(
        do_sample=False,
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,  # suppresses EOS: the same token count as kvpilot's ignore_eos
        pad_token_id=_pad_token_id(hf_model),
    )


def _pad_token_id(hf_model) -> int:
    config = hf_model.generation_config
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    eos = config.eos_token_id
    return int(eos[0] if isinstance(eos, list) else eos)


def _count_generated(generated: int, expected: int) -> int:
    if generated != expected:
        raise RuntimeError(f"transformers generated {generated} tokens, expected exactly {expected}")
    return generated


# llama.cpp (optional: `pip install llama-cpp-python`, compiles for ~13 minutes on 2 cores)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class _LlamaSequence:
    request: WorkloadRequest
    seq_id: int
    num_past: int = 0  # tokens already in this sequence's KV cache
    output: list[int] = field(default_factory=list)


def run_llama_cpp(gguf: str | Path, requests: list[WorkloadRequest], concurrency: int) -> SystemResult:
    """Greedy continuous batching over llama.cpp's low-level API: up to `concurrency` sequences
    share each `llama_decode` call (one token per decoding sequence plus whole new prompts),
    like llama.cpp's own server. Needs a llama-cpp-python with the `llama_memory_*` API."""
    import llama_cpp
    import numpy as np

    gguf = Path(gguf)
    if not hasattr(llama_cpp, "llama_memory_seq_rm"):
        raise RuntimeError("llama-cpp-python is too old: the llama_memory_* API is missing")
    max_len = max(r.prompt_len + r.output_len for r in requests)
    num_batch = max(512, max(r.prompt_len for r in requests) + concurrency)

    llama_cpp.llama_log_set(_quiet_llama_cpp_log(llama_cpp), None)  # it logs every graph tensor
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = concurrency * max_len  # enough whether the KV cache is unified or split per sequence
    params.n_batch = params.n_ubatch = num_batch
    params.n_seq_max = concurrency
    params.n_threads = params.n_threads_batch = os.cpu_count() or 1
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise RuntimeError(f"llama.cpp could not create a context for {concurrency} sequences")
    memory = llama_cpp.llama_get_memory(ctx)
    num_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(num_batch, 0, 1)

    pending = deque(requests)
    running: list[_LlamaSequence] = []
    free_seq_ids = list(range(concurrency))
    output_tokens = 0
    start = time.perf_counter()
    try:
        while pending or running:
            # (batch index whose logits we sample, sequence); decodes first, then new prompts.
            sampled: list[tuple[int, _LlamaSequence]] = []
            num_tokens = 0
            for seq in running:
                _add_token(batch, num_tokens, seq.output[-1], seq.num_past, seq.seq_id, logits=True)
                sampled.append((num_tokens, seq))
                num_tokens += 1
            while pending and free_seq_ids and num_tokens + pending[0].prompt_len <= num_batch:
                seq = _LlamaSequence(pending.popleft(), free_seq_ids.pop())
                for pos, token in enumerate(seq.request.prompt_token_ids):
                    is_last = pos == seq.request.prompt_len - 1
                    _add_token(batch, num_tokens, token, pos, seq.seq_id, logits=is_last)
                    num_tokens += 1
                sampled.append((num_tokens - 1, seq))
                running.append(seq)
            batch.n_tokens = num_tokens
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (KV cache full?)")
            for index, seq in sampled:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(num_vocab,))
                seq.num_past = seq.request.prompt_len + len(seq.output)
                seq.output.append(int(logits.argmax()))  # greedy; EOS is not special (ignore_eos)
            for seq in [s for s in running if len(s.output) == s.request.output_len]:
                running.remove(seq)
                llama_cpp.llama_memory_seq_rm(memory, seq.seq_id, -1, -1)
                free_seq_ids.append(seq.seq_id)
                output_tokens += len(seq.output)
        elapsed = time.perf_counter() - start
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    mode = gguf.stem.rsplit(".", 1)[-1].lower()  # SmolLM2-135M-Instruct.Q4_1 -> q4_1
    return SystemResult(mode, len(requests), output_tokens, elapsed)


@functools.cache
def _quiet_llama_cpp_log(llama_cpp):
    """A log callback that drops everything (cached: llama.cpp keeps calling it)."""
    return llama_cpp.llama_log_callback(lambda level, text, user_data: None)


def _add_token(batch, index: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    batch.token[index] = token
    batch.pos[index] = pos
    batch.n_seq_id[index] = 1
    batch.seq_id[index][0] = seq_id
    batch.logits[index] = logits
