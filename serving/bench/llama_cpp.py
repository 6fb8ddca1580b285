"""llama.cpp at its best, through llama-cpp-python's low-level batch API (the `bench` extra).

Continuous batching as llama.cpp's own server does it: every `llama_decode` carries one token
per decoding sequence plus whole new prompts. Two details decide whether llama.cpp batches at
all: with a split (non-unified) KV cache it cuts a batch into sub-batches of *consecutive,
increasing* sequence ids (`split_equal(..., sequential=true)`), so ids are handed out lowest
first and each batch lists its tokens in sequence-id order (`SeqIdPool`, `batch_order`).
`best_configuration` measures the KV-cache layouts and weight formats (the GGUF as shipped and
a Q8_0 re-quantization) on a slice of the workload, so kvpilot is compared with the fastest.
"""

import functools
import heapq
import importlib.util
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kvpilot.serving.bench.report import SystemResult
from kvpilot.serving.bench.workload import WorkloadRequest

Q8_0 = 7  # llama_ftype LLAMA_FTYPE_MOSTLY_Q8_0
# ggml's CPU features -> the CPU flag each needs. AMX stays off: ggml's AMX matmul crashed
# (SIGSEGV in ggml_backend_amx_mul_mat) on our Sapphire Rapids VMs, and our other CPUs lack it.
GGML_FEATURES = {
    "AVX": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AVX_VNNI": "avx_vnni",
}


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def cmake_args(cpu_flags: set[str]) -> str:
    """CMAKE_ARGS that build llama.cpp for exactly this CPU's features (what `-march=native`
    would, minus AMX)."""
    features = [
        f"-DGGML_{name}={'ON' if flag in cpu_flags else 'OFF'}" for name, flag in GGML_FEATURES.items()
    ]
    return " ".join(["-DGGML_NATIVE=OFF", *features, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"])


class SeqIdPool:
    """Sequence ids 0..n-1, always handing out the lowest free one (so running ids stay dense)."""

    def __init__(self, size: int):
        self._free = list(range(size))

    def acquire(self) -> int:
        return heapq.heappop(self._free)

    def release(self, seq_id: int) -> None:
        heapq.heappush(self._free, seq_id)

    def __bool__(self) -> bool:
        return bool(self._free)


@dataclass(frozen=True)
class LlamaCppConfig:
    gguf: Path
    kv_unified: bool

    @property
    def label(self) -> str:
        weights = self.gguf.stem.rsplit(".", 1)[-1].lower()  # SmolLM2-135M-Instruct.Q4_1 -> q4_1
        return f"{weights}, kv {'unified' if self.kv_unified else 'per seq'}"


@dataclass
class LlamaSequence:
    request: WorkloadRequest
    seq_id: int
    num_past: int = 0  # tokens already in this sequence's KV cache
    output: list[int] = field(default_factory=list)


def batch_order(sequences: list[LlamaSequence]) -> list[LlamaSequence]:
    """The order a llama.cpp batch lists its sequences in: increasing sequence id."""
    return sorted(sequences, key=lambda seq: seq.seq_id)


class LlamaCppContext:
    """One model + context with room for `num_seqs` sequences of up to `max_len` tokens."""

    def __init__(self, config: LlamaCppConfig, num_seqs: int, max_len: int, num_batch: int):
        import llama_cpp

        if not hasattr(llama_cpp, "llama_memory_seq_rm"):
            raise RuntimeError("llama-cpp-python is too old: the llama_memory_* API is missing")
        self.lib = llama_cpp
        llama_cpp.llama_log_set(_quiet_log(llama_cpp), None)  # it logs every graph tensor
        llama_cpp.llama_backend_init()
        path = str(config.gguf).encode()
        self.model = llama_cpp.llama_model_load_from_file(path, llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {config.gguf}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = num_seqs * max_len  # enough whether the KV cache is unified or split per sequence
        params.n_batch = params.n_ubatch = num_batch
        params.n_seq_max = num_seqs
        params.kv_unified = config.kv_unified
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {num_seqs} sequences")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.num_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.num_batch = num_batch
        self.batch = llama_cpp.llama_batch_init(num_batch, 0, 1)
        self.num_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Appends one token to the next batch; returns its index there."""
        index, batch = self.num_tokens, self.batch
        batch.token[index], batch.pos[index], batch.n_seq_id[index] = token, pos, 1
        batch.seq_id[index][0], batch.logits[index] = seq_id, logits
        self.num_tokens += 1
        return index

    def decode(self) -> None:
        self.batch.n_tokens, self.num_tokens = self.num_tokens, 0
        if self.lib.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed (KV cache full?)")

    def greedy(self, index: int) -> int:
        import numpy as np

        logits = self.lib.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(logits, shape=(self.num_vocab,)).argmax())

    def forget(self, seq_id: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


@contextmanager
def open_context(config: LlamaCppConfig, num_seqs: int, max_len: int, num_batch: int) -> Iterator:
    context = LlamaCppContext(config, num_seqs, max_len, num_batch)
    try:
        yield context
    finally:
        context.close()


def run(config: LlamaCppConfig, requests: list[WorkloadRequest], concurrency: int) -> SystemResult:
    """Greedy continuous batching of `requests`, up to `concurrency` sequences per decode."""
    max_len = max(r.prompt_len + r.output_len for r in requests)
    num_batch = max(512, max(r.prompt_len for r in requests) + concurrency)
    pending, running = deque(requests), []
    seq_ids = SeqIdPool(concurrency)
    output_tokens = 0
    with open_context(config, concurrency, max_len, num_batch) as context:
        start = time.perf_counter()
        while pending or running:
            num_tokens = len(running)  # one token per decoding sequence
            while pending and seq_ids and num_tokens + pending[0].prompt_len <= num_batch:
                num_tokens += pending[0].prompt_len
                running.append(LlamaSequence(pending.popleft(), seq_ids.acquire()))
            sampled = []  # (batch index whose logits we sample, sequence)
            for seq in batch_order(running):
                if seq.output:  # decoding: its last token
                    sampled.append((context.add(seq.output[-1], seq.num_past, seq.seq_id, True), seq))
                else:  # new: its whole prompt
                    prompt = seq.request.prompt_token_ids
                    for pos, token in enumerate(prompt):
                        index = context.add(token, pos, seq.seq_id, pos == len(prompt) - 1)
                    sampled.append((index, seq))
            context.decode()
            for index, seq in sampled:
                seq.num_past = seq.request.prompt_len + len(seq.output)
                seq.output.append(context.greedy(index))  # EOS is not special (ignore_eos)
            for seq in [s for s in running if len(s.output) == s.request.output_len]:
                running.remove(seq)
                context.forget(seq.seq_id)
                seq_ids.release(seq.seq_id)
                output_tokens += len(seq.output)
        elapsed = time.perf_counter() - start
    return SystemResult(f"{config.label}, {concurrency} seqs", len(requests), output_tokens, elapsed)


def requantized_q8_0(gguf: Path, cache: Path | None = None) -> Path:
    """The GGUF re-quantized to Q8_0 by llama.cpp itself (cached next to other bench files)."""
    import llama_cpp

    cache = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvpilot" / "bench"
    target = cache / f"{gguf.stem.rsplit('.', 1)[0]}.Q8_0.gguf"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = Q8_0, True
        partial = target.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not re-quantize {gguf} to Q8_0")
        partial.rename(target)
    return target


def configurations(gguf: Path) -> list[LlamaCppConfig]:
    """The GGUF as shipped and its Q8_0 re-quantization, each with a unified and a split KV cache."""
    files = [gguf] if "q8_0" in gguf.name.lower() else [gguf, requantized_q8_0(gguf)]
    return [LlamaCppConfig(path, kv_unified) for path in files for kv_unified in (False, True)]


def best_configuration(
    gguf: Path, requests: list[WorkloadRequest], concurrency: int
) -> tuple[LlamaCppConfig, dict[str, float]]:
    """The fastest configuration on `requests` (a slice of the workload), with every one's tokens/s."""
    rates = {}
    for config in configurations(gguf):
        rates[config.label] = run(config, requests, concurrency).output_tokens_per_s
        print(f"llama.cpp {config.label}: {rates[config.label]:.1f} tokens/s on {len(requests)} requests")
    best = max(configurations(gguf), key=lambda config: rates[config.label])
    return best, rates


@functools.cache
def _quiet_log(llama_cpp):
    """A log callback that drops everything (cached: llama.cpp keeps calling it)."""
    return llama_cpp.llama_log_callback(lambda level, text, user_data: None)


if __name__ == "__main__":  # `make bench`: the CMAKE_ARGS for this machine
    from kvpilot.serving.bench.machine import all_cpu_flags

    print(cmake_args(all_cpu_flags()))
