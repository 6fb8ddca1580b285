"""The model runner: owns the model, the paged KV cache and every tensor of a step."""

import itertools
from dataclasses import dataclass, field

import torch
from kvpilot.kernels import huge_pages
from kvpilot.kernels.attention import build_attention_metadata
from kvpilot.kernels.quant.kv_cache import KVCache, allocate_kv_cache, kv_block_bytes
from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.engine.container_memory import host_memory
from kvpilot.serving.engine.kv_cache_sizing import DeviceMemory, plan_kv_cache
from kvpilot.serving.engine.logprobs import token_logprobs
from kvpilot.serving.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from kvpilot.serving.loader import TORCH_DTYPES, checkpoint_dtype, load_model, resolve_dtype
from kvpilot.serving.validation import InvalidParameter

PROMPT_LOGITS_ROWS = 256  # prompt-logprob rows turned into logits at once (bounds a [rows, vocab] tensor)


@dataclass
class ModelRunnerOutput:
    # float32 on the CPU, [sum of the chunks' num_sample_rows, vocab]: per sampling chunk, in chunk
    # order, its last token's logits and then one row per draft token.
    logits: torch.Tensor
    # request id -> one entry per token of the chunk's prompt_logprob_token_ids
    prompt_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        # CUDA tensors make kvpilot.kernels.backend pick the Triton kernels; CPU ones the CPU path.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        is_cuda = self.device.type == "cuda"
        bf16_supported = not is_cuda or torch.cuda.is_bf16_supported()
        self.dtype_name = resolve_dtype(
            config.dtype, checkpoint_dtype(config.model), self.device.type, bf16_supported
        )
        if self.device.type == "cpu":
            huge_pages.enable_for_torch_allocations()
        loaded = load_model(config.model, self.dtype_name, config.quantization, self.device)
        self.model = loaded.model
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.chat_template = loaded.chat_template
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = loaded.config.vocab_size
        self.block_size = config.block_size
        self.dtype = TORCH_DTYPES[self.dtype_name]
        self.weight_bytes = self.model.weight_bytes

        model_len = loaded.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_len:
            raise InvalidParameter(
                "max_model_len", f"{config.max_model_len} exceeds the model's context length {model_len}"
            )
        self.max_model_len = config.max_model_len or model_len

        sized_by_device = is_cuda and config.num_kv_blocks is None and config.kv_cache_memory_bytes is None
        self.kv_cache_plan = plan_kv_cache(
            self.kv_cache_bytes_per_block(),
            config.num_kv_blocks,
            config.kv_cache_memory_bytes,
            config.gpu_memory_utilization,
            self._measure_cuda_memory() if sized_by_device else None,
            None if is_cuda else host_memory(),
        )
        self.num_kv_blocks = self.kv_cache_plan.num_blocks
        self.kv_caches = self._allocate_kv_caches(self.num_kv_blocks)

    def kv_cache_bytes_per_block(self) -> int:
        """One block in every layer, K and V (and int8 scales), in the kv_cache_dtype."""
        c = self.model_config
        per_layer = kv_block_bytes(
            self.block_size, c.num_key_value_heads, c.head_dim, self.config.kv_cache_dtype, self.dtype
        )
        return c.num_hidden_layers * per_layer

    def _measure_cuda_memory(self) -> DeviceMemory:
        """The figures `plan_kv_cache` needs, measured around a profiling forward."""
        torch.cuda.synchronize(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        activation_peak = self.profile_activation_peak()
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = max(0, total - free - torch.cuda.memory_reserved(self.device))
        return DeviceMemory(total, weights, activation_peak, non_torch)

    def profiling_batch(self) -> tuple[SchedulerOutput, int]:
        """The largest step the scheduler can hand over: max_num_batched_tokens prompt tokens over
        max_num_seqs sequences, each sampled; and the KV blocks it needs."""
        config = self.config
        num_tokens = min(config.max_num_batched_tokens, config.max_num_seqs * self.max_model_len)
        num_seqs = min(config.max_num_seqs, num_tokens)
        chunks, next_block = [], 0
        for index in range(num_seqs):
            length = num_tokens // num_seqs + (index < num_tokens % num_seqs)
            num_blocks = -(-length // self.block_size)
            table = list(range(next_block, next_block + num_blocks))
            next_block += num_blocks
            chunks.append(ScheduledChunk(f"profile-{index}", [0] * length, 0, table, sample=True))
        return SchedulerOutput(chunks, num_tokens), next_block

    def profile_activation_peak(self) -> int:
        """Bytes a forward at the largest batch allocates above what is held before it (CUDA)."""
        batch, num_blocks = self.profiling_batch()
        self.kv_caches = self._allocate_kv_caches(num_blocks)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.execute_model(batch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del self.kv_caches
        torch.cuda.empty_cache()
        return peak

    def _allocate_kv_caches(
        self, num_blocks: int
    ) -> list[tuple[torch.Tensor | KVCache, torch.Tensor | KVCache]]:
        c = self.model_config
        shape = (num_blocks, self.block_size, c.num_key_value_heads, c.head_dim)
        dtypes = (self.config.kv_cache_dtype, self.dtype, self.device)
        return [tuple(allocate_kv_cache(*shape, *dtypes) for _ in "kv") for _ in range(c.num_hidden_layers)]

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One forward pass over the step's chunks; logits only where sampling or prompt
        logprobs need them."""
        chunks = scheduler_output.chunks
        query_lens = [len(chunk.token_ids) for chunk in chunks]
        metadata = build_attention_metadata(
            query_lens,
            [chunk.num_computed_tokens for chunk in chunks],
            [chunk.block_table for chunk in chunks],
            self.block_size,
            self.device,
        )
        token_ids = [t for chunk in chunks for t in chunk.token_ids]
        input_ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        hidden = self.model.forward(input_ids, metadata, self.kv_caches)
        starts = [0, *itertools.accumulate(query_lens)]
        sample_rows = [
            row
            for i, chunk in enumerate(chunks)
            for row in range(starts[i + 1] - chunk.num_sample_rows, starts[i + 1])
        ]
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[rows]).float().cpu()  # the sampler runs on CPU
        prompt_logprobs = {
            chunk.request_id: self._prompt_logprobs(hidden[starts[i] :], chunk)
            for i, chunk in enumerate(chunks)
            if chunk.prompt_logprob_token_ids
        }
        return ModelRunnerOutput(logits, prompt_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor, chunk: ScheduledChunk) -> list[dict[int, float]]:
        """Entries for the chunk's first positions (row j predicts prompt_logprob_token_ids[j])."""
        targets = chunk.prompt_logprob_token_ids
        entries: list[dict[int, float]] = []
        for begin in range(0, len(targets), PROMPT_LOGITS_ROWS):
            part = targets[begin : begin + PROMPT_LOGITS_ROWS]
            logits = self.model.compute_logits(hidden[begin : begin + len(part)])
            entries += token_logprobs(logits, part, chunk.num_prompt_logprobs)
        return entries
