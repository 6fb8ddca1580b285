"""How many KV blocks, and why: `plan_kv_cache` on fake device and container memory figures, the
container's limit read from cgroup files, `--dtype auto`, and the profiling batch the runner
measures the activation peak with."""

import pytest
import torch
from kvpilot.serving.engine import container_memory
from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.engine.container_memory import read_host_memory
from kvpilot.serving.engine.kv_cache_sizing import (
    CPU_KV_CACHE_BYTES,
    DeviceMemory,
    HostMemory,
    plan_kv_cache,
)
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
        # a 4 GiB container holding 1 GiB: 0.9 x 4 - 1 = 2.6 GiB left, the 1 GiB default fits
        (dict(host=HostMemory(4 * GIB, GIB)), 512, "the CPU default (--kv-cache-memory) 1.00 GiB /"),
        # a 2 GiB container holding 1.5 GiB: 0.9 x 2 - 1.5 = 0.3 GiB left, the default shrinks to it
        (
            dict(host=HostMemory(2 * GIB, 3 * GIB // 2)),
            (int(0.9 * 2 * GIB) - 3 * GIB // 2) // BLOCK,
            "1.00 GiB, capped by 0.9 x the container's memory limit 2.00 GiB - its working set 1.50 GiB"
            " = 0.30 GiB",
        ),
        (dict(host=HostMemory(2 * GIB, GIB), kv_cache_memory_bytes=GIB // 2), 256, "--kv-cache-memory 0.50"),
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
        (dict(host=HostMemory(GIB, GIB - BLOCK)), "kv_cache_memory_bytes"),  # 0.9 x 1 GiB < held
    ],
)
def test_no_room_for_one_block_names_the_setting_and_the_figures(kwargs, param):
    with pytest.raises(InvalidParameter) as raised:
        plan_kv_cache(BLOCK, **kwargs)
    assert raised.value.param == param and "leaves no room for one KV block" in raised.value.message
    assert "GiB" in raised.value.message


@pytest.mark.parametrize(
    ("kwargs", "param", "setting"),
    [
        (dict(kv_cache_memory_bytes=GIB), "kv_cache_memory_bytes", "--kv-cache-memory 1.00 GiB"),
        (dict(num_kv_blocks=512), "num_kv_blocks", "--num-kv-blocks 512 (1.00 GiB)"),
    ],
)
def test_an_explicit_cache_the_container_cannot_hold_is_refused_with_the_figures(kwargs, param, setting):
    with pytest.raises(InvalidParameter) as raised:
        plan_kv_cache(BLOCK, **kwargs, host=HostMemory(2 * GIB, GIB))
    assert raised.value.param == param
    assert raised.value.message == (
        f"{setting} does not fit: 0.9 x the container's memory limit 2.00 GiB"
        " - its working set 1.00 GiB = 0.80 GiB"
    )
    assert plan_kv_cache(BLOCK, **kwargs, host=HostMemory(3 * GIB, GIB)).num_blocks == 512  # 1.7 GiB left


def fake_cgroup(directory, limit: str, usage: int, inactive_file: int, v1: bool = False) -> None:
    names = (
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        if v1
        else ("memory.max", "memory.current", "inactive_file")
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / names[0]).write_text(f"{limit}\n")
    (directory / names[1]).write_text(f"{usage}\n")
    (directory / "memory.stat").write_text(f"anon {usage}\n{names[2]} {inactive_file}\nactive_file 7\n")


@pytest.mark.parametrize(
    ("groups", "cgroups", "expected"),
    [
        # cgroup v2 inside a container's namespace: the root is its own group
        ("0::/\n", {"": ("max", GIB, 0, False)}, None),
        ("0::/\n", {"": (GIB, GIB // 2, GIB // 4, False)}, HostMemory(GIB, GIB // 4)),
        # v2 without a namespace: the process's own group
        ("0::/kubepods/pod1\n", {"kubepods/pod1": (GIB, 100, 0, False)}, HostMemory(GIB, 100)),
        # v1: the memory controller's own group before the root
        (
            "5:cpu,cpuacct:/\n4:memory:/batch\n1:name=systemd:/\n",
            {"memory/batch": (2 * GIB, GIB, 0, True), "memory": (9223372036854771712, 5, 0, True)},
            HostMemory(2 * GIB, GIB),
        ),
        ("4:memory:/docker/abc\n", {"memory": (2 * GIB, 300, 100, True)}, HostMemory(2 * GIB, 200)),
        ("4:memory:/\n", {"memory": (9223372036854771712, 5, 0, True)}, None),  # v1's "no limit"
        ("", {}, None),  # no cgroup filesystem
    ],
)
def test_the_limit_and_working_set_are_read_from_the_process_cgroup(tmp_path, groups, cgroups, expected):
    for directory, figures in cgroups.items():
        fake_cgroup(tmp_path / "fs" / directory, *figures)
    (tmp_path / "cgroup").write_text(groups)
    assert read_host_memory(tmp_path / "fs", tmp_path / "cgroup") == expected


def test_a_cpu_runner_in_a_small_container_shrinks_its_default_cache_and_refuses_a_big_one(
    tiny_llama, tmp_path, monkeypatch
):
    """The runner reads its container's limit (2 GiB) and working set (1.5 GiB) on CPU."""
    fake_cgroup(tmp_path, 2 * GIB, 3 * GIB // 2 + 4096, 4096)
    (tmp_path / "cgroup").write_text("0::/\n")
    monkeypatch.setattr(container_memory, "CGROUP", tmp_path)
    monkeypatch.setattr(container_memory, "PROC_CGROUP", tmp_path / "cgroup")
    runner = ModelRunner(EngineConfig(model=str(tiny_llama)))
    per_block = runner.kv_cache_bytes_per_block()
    assert runner.num_kv_blocks == (int(0.9 * 2 * GIB) - 3 * GIB // 2) // per_block
    assert "capped by 0.9 x the container's memory limit 2.00 GiB" in runner.kv_cache_plan.reason
    with pytest.raises(InvalidParameter, match=r"--kv-cache-memory 1\.00 GiB does not fit"):
        ModelRunner(EngineConfig(model=str(tiny_llama), kv_cache_memory_bytes=GIB))


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
    logits = runner.execute_model(batch).logits
    assert logits.shape == (len(lengths), runner.vocab_size) and torch.isfinite(logits).all()
