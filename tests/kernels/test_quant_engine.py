"""Quantization through the engine's own entry points: ModelRunner, LLM, EngineConfig."""

import json
import shutil

import pytest
import torch
from kvpilot.kernels.quant import Int4Weight, Int8Weight
from kvpilot.kernels.quant.kv_cache import KVCache
from kvpilot.serving import LLM, SamplingParams
from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.engine.model_runner import ModelRunner

BUDGET = 8 << 20


@pytest.fixture(scope="module")
def runners(tiny_llama):
    def build(**overrides) -> ModelRunner:
        return ModelRunner(EngineConfig(model=str(tiny_llama), kv_cache_memory_bytes=BUDGET, **overrides))

    return build


def test_kv_cache_dtype_sets_storage_and_block_count(runners):
    auto = runners()
    int8 = runners(kv_cache_dtype="int8")
    fp8 = runners(kv_cache_dtype="fp8")
    assert isinstance(auto.kv_caches[0][0], torch.Tensor)
    key = int8.kv_caches[0][0]
    assert isinstance(key, KVCache) and key.data.dtype == torch.int8 and key.scales.dtype == torch.float32
    assert fp8.kv_caches[0][1].data.dtype == torch.float8_e4m3fn
    # head_dim 16: int8 stores 16 bytes + a 4-byte scale per token per head instead of 64 bytes
    assert int8.num_kv_blocks == auto.num_kv_blocks * 64 // 20
    assert fp8.num_kv_blocks == auto.num_kv_blocks * 4
    allocated = sum(cache.nbytes for layer in int8.kv_caches for cache in layer)
    assert allocated <= BUDGET and allocated == int8.num_kv_blocks * int8.kv_cache_bytes_per_block()


def test_weight_modes_keep_linear_weights_quantized(runners):
    sizes = {}
    for mode, kind in (("int8", Int8Weight), ("int4", Int4Weight)):
        runner = runners(quantization=mode)
        assert isinstance(runner.model.layers[0].mlp.down_proj.weight, kind)
        assert isinstance(runner.model.embed_tokens.weight, torch.Tensor)  # float tables stay float
        sizes[mode] = runner.weight_bytes
    sizes["none"] = runners().weight_bytes
    assert sizes["none"] > sizes["int8"] > sizes["int4"]


def test_quantized_engine_generates(tiny_llama):
    llm = LLM(str(tiny_llama), quantization="int4", kv_cache_dtype="int8", num_kv_blocks=64)
    outputs = llm.generate(
        [[1, 2, 3, 4], [5, 6]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    )
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 5]
    assert llm.llm_engine.get_stats().num_running == 0


def test_prequantized_checkpoint_is_a_startup_error_naming_the_flag(tiny_llama, tmp_path):
    directory = shutil.copytree(tiny_llama, tmp_path / "gptq")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization: .*'gptq'.*--quantization int8"):
        ModelRunner(EngineConfig(model=str(directory), quantization="int8"))


@pytest.mark.parametrize(("field", "value"), [("quantization", "int3"), ("kv_cache_dtype", "int4")])
def test_unknown_modes_name_the_field(tiny_llama, field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model=str(tiny_llama), **{field: value})
