"""Loading checkpoints: every supported architecture, optional tokenizer, sharding, dtypes, clear errors."""

import json
import shutil

import gguf
import pytest
import torch
import transformers
from kvpilot.serving.engine.config import EngineConfig
from kvpilot.serving.engine.model_runner import ModelRunner
from kvpilot.serving.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from kvpilot.serving.loader import CheckpointError, load_model
from safetensors.torch import load_file, save_file

PROMPT = [1, 504, 3458, 282, 4649, 314, 2, 77, 900]


def dense(weight) -> torch.Tensor:
    """A float weight as a plain tensor, whether or not the backend packed it for its matmul."""
    return weight if isinstance(weight, torch.Tensor) else weight.dense()


def logits_for(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    chunk = ScheduledChunk("r", token_ids, 0, list(range(-(-len(token_ids) // runner.block_size))), True)
    return runner.execute_model(SchedulerOutput([chunk], len(token_ids))).logits


def model_only_copy(src, dst):
    """The checkpoint without tokenizer files."""
    dst.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.mark.parametrize(
    ("arch", "architecture", "qkv_bias", "qk_norm", "tied", "head_dim"),
    [
        ("llama", "LlamaForCausalLM", False, False, True, 16),
        ("mistral", "MistralForCausalLM", False, False, False, 16),
        ("qwen2", "Qwen2ForCausalLM", True, False, False, 16),
        ("qwen3", "Qwen3ForCausalLM", False, True, False, 32),
    ],
)
def test_each_architecture_loads(tiny_checkpoints, arch, architecture, qkv_bias, qk_norm, tied, head_dim):
    loaded = load_model(tiny_checkpoints[arch])
    config = loaded.config
    assert (config.architecture, config.qkv_bias, config.qk_norm) == (architecture, qkv_bias, qk_norm)
    assert (config.tie_word_embeddings, config.head_dim) == (tied, head_dim)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, 49152)
    assert (config.rope_scaling is not None) == (arch == "llama")
    assert loaded.eos_token_ids == {2}
    assert loaded.tokenizer is not None and loaded.tokenizer.encode("Hello") == [19556]
    assert loaded.chat_template and "im_start" in loaded.chat_template
    # A tied head multiplies by the embedding table (kept in the matmul's own layout on CPU).
    assert torch.equal(dense(loaded.model.lm_head.weight), loaded.model.embed_tokens.weight) == tied


def test_runner_reports_sizes_and_sizes_the_cache_from_memory(tiny_llama):
    # tiny llama: 2 layers x 2 kv heads x head_dim 16, float32 -> K+V of one 16-token block = 8192 bytes
    runner = ModelRunner(EngineConfig(model=str(tiny_llama), kv_cache_memory_bytes=10 * 8192 + 100))
    assert runner.kv_cache_bytes_per_block() == 8192
    assert runner.num_kv_blocks == 10
    assert runner.kv_caches[0][0].shape == (10, 16, 2, 16) and len(runner.kv_caches) == 2
    assert (runner.max_model_len, runner.vocab_size, runner.eos_token_ids) == (2048, 49152, {2})
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    params = sum(p.numel() for p in reference.parameters())  # the tied table counted once
    # The tied head is also kept packed for oneDNN's matmul beside the embedding's plain table.
    assert reference.config.tie_word_embeddings
    assert runner.weight_bytes == (params + 49152 * 64) * 4
    assert (
        ModelRunner(EngineConfig(model=str(tiny_llama), num_kv_blocks=3, max_model_len=64)).max_model_len
        == 64
    )
    with pytest.raises(ValueError, match="max_model_len"):
        ModelRunner(EngineConfig(model=str(tiny_llama), max_model_len=4096))


def test_directory_without_tokenizer_loads(tiny_llama, tmp_path):
    loaded = load_model(model_only_copy(tiny_llama, tmp_path / "bare"))
    assert loaded.tokenizer is None and loaded.chat_template is None
    assert loaded.eos_token_ids == {2}


def test_sharded_checkpoint_gives_the_same_logits(tiny_checkpoints, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"])
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    sharded = ModelRunner(EngineConfig(model=str(tmp_path), num_kv_blocks=4))
    single = ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=4))
    assert torch.equal(logits_for(sharded, PROMPT), logits_for(single, PROMPT))


def test_bfloat16_loads_and_agrees_with_float32(tiny_checkpoints):
    path = str(tiny_checkpoints["qwen3"])
    bf16 = ModelRunner(EngineConfig(model=path, num_kv_blocks=4, dtype="bfloat16"))
    assert bf16.kv_caches[0][0].dtype == torch.bfloat16
    assert bf16.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    fp32_logits = logits_for(ModelRunner(EngineConfig(model=path, num_kv_blocks=4)), PROMPT)
    bf16_logits = logits_for(bf16, PROMPT)
    assert bf16_logits.dtype == torch.float32
    assert torch.cosine_similarity(bf16_logits, fp32_logits).item() > 0.99


def edit_config(checkpoint, tmp_path, **changes):
    directory = model_only_copy(checkpoint, tmp_path / "edited")
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(architectures=["GPT2LMHeadModel"]), r"config\.json: field 'architectures': unsupported"),
        (dict(hidden_size=None), r"config\.json: missing field 'hidden_size'"),
        (dict(num_hidden_layers="two"), r"config\.json: field 'num_hidden_layers' must be int"),
        (dict(num_hidden_layers=0), r"config\.json: field 'num_hidden_layers' must be > 0"),
        (dict(num_key_value_heads=3), r"config\.json: field 'num_key_value_heads': 3 does not divide"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), r"'rope_parameters'.*'yarn'"),
        (dict(hidden_size=96), r"model\.safetensors.*model\.embed_tokens\.weight' has shape \[49152, 64\]"),
    ],
)
def test_broken_config_is_a_clear_error(tiny_llama, tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(edit_config(tiny_llama, tmp_path, **changes))


def test_corrupt_config_json(tiny_llama, tmp_path):
    directory = model_only_copy(tiny_llama, tmp_path / "bad")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(directory)


def test_missing_tensor_names_it(tiny_llama, tmp_path):
    directory = model_only_copy(tiny_llama, tmp_path / "bad")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        load_model(directory)


def test_truncated_safetensors_names_the_file(tiny_llama, tmp_path):
    directory = model_only_copy(tiny_llama, tmp_path / "bad")
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(directory)


def test_missing_path_and_bad_gguf_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nowhere")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        load_model(junk)
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        CheckpointError, match=r"gpt2\.gguf: metadata 'general\.architecture': unsupported 'gpt2'"
    ):
        load_model(tmp_path / "gpt2.gguf")


def write_gguf_like_llama_cpp(checkpoint, path, quantized: dict[str, gguf.GGMLQuantizationType]):
    """The checkpoint as llama.cpp's converter writes it: llama metadata, GGUF tensor names, q/k
    rows permuted for its rotary layout, some tensors quantized."""
    config = json.loads((checkpoint / "config.json").read_text())
    heads, kv_heads, layers = (
        config[k] for k in ("num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    )
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_eos_token_id(2)

    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    layer_names |= {f"self_attn.{p}_proj": f"attn_{p}" for p in "qkv"} | {"self_attn.o_proj": "attn_output"}
    layer_names |= {f"mlp.{p}_proj": f"ffn_{p}" for p in ("gate", "up", "down")}
    for i in range(layers):
        names |= {
            f"model.layers.{i}.{hf}.weight": f"blk.{i}.{name}.weight" for hf, name in layer_names.items()
        }
    for hf_name, tensor in load_file(checkpoint / "model.safetensors").items():
        array, name = tensor.numpy(), names[hf_name]
        if ".attn_q." in name or ".attn_k." in name:
            array = permute(array, heads if ".attn_q." in name else kv_heads)
        if name in quantized:
            writer.add_tensor(name, gguf.quants.quantize(array, quantized[name]), raw_dtype=quantized[name])
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_loads_like_the_checkpoint_it_was_converted_from(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints["mistral"]
    f32 = write_gguf_like_llama_cpp(checkpoint, tmp_path / "f32.gguf", {})
    loaded = load_model(f32)
    assert loaded.tokenizer is None and loaded.eos_token_ids == {2}
    assert not loaded.config.tie_word_embeddings and loaded.config.head_dim == 16
    expected = logits_for(ModelRunner(EngineConfig(model=str(checkpoint), num_kv_blocks=4)), PROMPT)
    torch.testing.assert_close(
        logits_for(ModelRunner(EngineConfig(model=str(f32), num_kv_blocks=4)), PROMPT), expected
    )

    q8, f16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
    mixed = write_gguf_like_llama_cpp(
        checkpoint, tmp_path / "mixed.gguf", {"blk.0.attn_q.weight": q8, "blk.1.ffn_down.weight": f16}
    )
    model = load_model(mixed).model
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).model.layers
    for ours, theirs in [
        (
            dense(model.layers[0].self_attn.qkv_proj.parts[0].weight)[:64],
            reference[0].self_attn.q_proj.weight,
        ),
        (dense(model.layers[1].mlp.down_proj.weight), reference[1].mlp.down_proj.weight),
    ]:
        assert ours.dtype == torch.float32
        theirs = theirs.detach()
        torch.testing.assert_close(ours, theirs, atol=float(theirs.abs().max()) / 100, rtol=0)
