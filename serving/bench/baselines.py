"""The systems kvpilot is measured against, each run on the same workload requests.

- `transformers` `generate`, one request at a time (what a user without a serving engine does);
- `transformers` `generate` on static, left-padded batches, each running to its longest request;
(llama.cpp, the third peer, lives in `llama_cpp.py`.)
Every request generates exactly its `output_len` tokens (EOS is suppressed until then), so
output token counts match kvpilot's.
"""

import time
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
