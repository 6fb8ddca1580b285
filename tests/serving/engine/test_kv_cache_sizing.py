"""How many KV blocks, and why: `plan_kv_cache` on fake device memory figures, `--dtype auto`,
and the profiling batch the runner measures the activation peak with."""

import pytest
import torch
from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.engine.kv_cache_sizing import CPU_KV_CACHE_BYTES, DeviceMemory, plan_kv_cache
from kvpilot.serving.engine.model_runner import ModelRunner
from kvpilot.serving.loader import checkpoint_dtype, resolve_dtype
from kvpilot.serving.validation import InvalidParameter

GIB = 1 << 30
BLOCK = 2 * 1 << 20  # 2 MiB per block (all layers, K and V)
H200 = DeviceMemory(total=140 * GIB, weights=16 * GIB, activation_peak=2 * GIB, non_torch=GIB)


@pytest.mark.parametrize(
    ("kwargs", "num_blocks", "reason"),
    [
        # 0.9 x 140 GiB = 126 GiB; - 16 - 2 - 1 = 107 GiB = 54784 blocks of 2 MiB
        (
            dict(memory=H200),
            107 * 512,
            "--gpu-memory-utilization 0.9 x 140.00 GiB = 126.00 GiB - weights 16.00",
        ),
        (dict(memory=H200, gpu_memory_utilization=0.5), 51 * 512, "= 70.00 GiB - weights 16.00 GiB"),
        # integer bytes: int(0.95 * 140 GiB) - 19 GiB, rounded down to whole blocks
        (
            dict(memory=H200, gpu_memory_utilization=0.95),
            (int(0.95 * 140 * GIB) - 19 * GIB) // BLOCK,
            "0.95 x",
        ),
        (dict(memory=H200, kv_cache_memory_bytes=3 * GIB), 3 * 512, "--kv-cache-memory 3.00 GiB"),
        (dict(memory=H200, num_kv_blocks=7, kv_cache_memory_bytes=GIB), 7, "--num-kv-blocks 7"),
        (dict(), CPU_KV_CACHE_BYTES // BLOCK, "the CPU default (--kv-cache-memory) 1.00 GiB"),
        (dict(kv_cache_memory_bytes=BLOCK * 3 + 5), 3, "--kv-cache-memory"),
    ],
)
def test_plan(kwargs, num_blocks, reason):
    plan = plan_kv_cache(BLOCK, **kwargs)
    assert plan.num_blocks == num_blocks and plan.bytes_per_block == BLOCK
    assert reason in plan.reason, plan.reason


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        # 0.1 x 140 GiB = 14 GiB < 16 GiB of weights
        (dict(memory=H200, gpu_memory_utilization=0.1), "gpu_memory_utilization"),
        (dict(memory=DeviceMemory(80 * GIB, 70 * GIB, 2 * GIB, 0)), "gpu_memory_utilization"),
        (dict(kv_cache_memory_bytes=BLOCK - 1), "kv_cache_memory_bytes"),
    ],
)
def test_no_room_for_one_block_names_the_setting_and_the_figures(kwargs, param):
    with pytest.raises(InvalidParameter) as raised:
        plan_kv_cache(BLOCK, **kwargs)
    assert raised.value.param == param and "leaves no room for one KV block" in raised.value.message
    assert "GiB" in raised.value.message


@pytest.mark.parametrize(
    ("requested", "checkpoint", "device", "bf16", "resolved"),
    [
        ("auto", "bfloat16", "cpu", True, "float32"),
        ("auto", "bfloat16", "cuda", True, "bfloat16"),
        ("auto", "float16", "cuda", True, "float16"),
        ("auto", "float32", "cuda", True, "bfloat16"),
        ("auto", None, "cuda", True, "bfloat16"),  # GGUF
        ("auto", "bfloat16", "cuda", False, "float16"),  # a GPU without bfloat16 (pre-Ampere)
        ("auto", None, "cuda", False, "float16"),
        ("float32", "bfloat16", "cuda", True, "float32"),
        ("bfloat16", "float32", "cpu", True, "bfloat16"),
    ],
)
def test_dtype_auto(requested, checkpoint, device, bf16, resolved):
    assert resolve_dtype(requested, checkpoint, device, bf16) == resolved


def test_checkpoint_dtype_is_read_from_config_json(tiny_llama, default_gguf):
    assert checkpoint_dtype(tiny_llama) == "float32"
    assert checkpoint_dtype(default_gguf) is None


def test_dtype_auto_on_cpu_is_float32_and_the_plan_says_why(tiny_llama):
    runner = ModelRunner(EngineConfig(model=str(tiny_llama), kv_cache_memory_bytes=64 << 20))
    assert runner.dtype_name == "float32" and runner.kv_caches[0][0].dtype == torch.float32
    assert runner.num_kv_blocks == (64 << 20) // runner.kv_cache_bytes_per_block()
    assert runner.kv_cache_plan.reason.startswith("--kv-cache-memory 0.06 GiB")


@pytest.mark.parametrize(("max_num_seqs", "max_num_batched_tokens"), [(4, 70), (64, 512), (8, 3)])
def test_the_profiling_batch_is_the_largest_step_and_runs(tiny_llama, max_num_seqs, max_num_batched_tokens):
    config = EngineConfig(
        model=str(tiny_llama),
        num_kv_blocks=4,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    runner = ModelRunner(config)
    batch, num_blocks = runner.profiling_batch()
    lengths = [len(chunk.token_ids) for chunk in batch.chunks]
    assert sum(lengths) == batch.num_batched_tokens == max_num_batched_tokens
    assert len(lengths) == min(max_num_seqs, max_num_batched_tokens) and max(lengths) - min(lengths) <= 1
    tables = [block for chunk in batch.chunks for block in chunk.block_table]
    assert tables == list(range(num_blocks))  # each sequence its own blocks
    assert all(chunk.sample and chunk.num_computed_tokens == 0 for chunk in batch.chunks)
    runner.kv_caches = runner._allocate_kv_caches(num_blocks)
    logits = runner.execute_model(batch)
    assert logits.shape == (len(lengths), runner.vocab_size) and torch.isfinite(logits).all()
