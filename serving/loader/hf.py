"""Hugging Face checkpoint directories: config.json, safetensors (single or sharded), tokenizer,
generation_config.json."""

import json
from pathlib import Path

from kvpilot.serving.loader.errors import CheckpointError
from kvpilot.serving.loader.weights import TensorRef
from kvpilot.serving.models.config import ARCHITECTURES, ModelConfig
from kvpilot.serving.models.layers import RopeScaling
from safetensors import safe_open

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


def model_config(directory: Path, dtype: str, has_lm_head: bool) -> ModelConfig:
    path = directory / CONFIG
    raw = read_json(path)

    def field(name: str, kind: type = int, default: object = ...):
        value = raw.get(name, default)
        if value is ... or (value is None and default is ...):
            raise CheckpointError(path, f"missing field {name!r}")
        if value is not None and (
            not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
        ):
            raise CheckpointError(
                path, f"field {name!r} must be {getattr(kind, '__name__', 'a number')}, got {value!r}"
            )
        if kind is int and value is not None and value <= 0:
            raise CheckpointError(path, f"field {name!r} must be > 0, got {value!r}")
        return value

    architectures = field("architectures", list)
    architecture = architectures[0] if architectures else None
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            path, f"field 'architectures': unsupported {architectures!r}, supported: {sorted(ARCHITECTURES)}"
        )
    flags = ARCHITECTURES[architecture]
    if field("hidden_act", str, "silu") != "silu":
        raise CheckpointError(
            path, f"field 'hidden_act': only 'silu' is supported, got {raw['hidden_act']!r}"
        )
    if field("mlp_bias", bool, False) or (field("attention_bias", bool, False) and not flags.qkv_bias):
        raise CheckpointError(path, "fields 'attention_bias'/'mlp_bias': biases are not supported here")
    hidden_size = field("hidden_size")
    num_heads = field("num_attention_heads")
    head_dim = field("head_dim", int, None) or hidden_size // num_heads
    num_kv_heads = field("num_key_value_heads", int, None) or num_heads
    if num_heads % num_kv_heads:
        raise CheckpointError(
            path,
            f"field 'num_key_value_heads': {num_kv_heads} does not divide num_attention_heads {num_heads}",
        )
    theta, scaling = _rope(path, raw)
    max_positions = field("max_position_embeddings", int, 2048)
    if raw.get("use_sliding_window", True) and field("sliding_window", int, None):
        max_positions = min(max_positions, raw["sliding_window"])  # full attention within the window
    return ModelConfig(
        architecture=architecture,
        vocab_size=field("vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=field("intermediate_size"),
        num_hidden_layers=field("num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(field("rms_norm_eps", (int, float), 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=field("tie_word_embeddings", bool, not has_lm_head),
        qkv_bias=flags.qkv_bias,
        qk_norm=flags.qk_norm,
        dtype=dtype,
    )


def _rope(path: Path, raw: dict) -> tuple[float, RopeScaling | None]:
    """transformers 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    name = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(
            path, f"field {name!r}: rope_type {rope_type!r} is not supported (default, llama3)"
        )
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise CheckpointError(path, f"field {name!r}: missing {exc.args[0]!r}") from None
    return theta, scaling


def safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = directory / INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(index, "missing field 'weight_map'")
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(directory, "no *.safetensors files")
    names = {}
    for file in files:
        with _open(file) as handle:
            names.update(dict.fromkeys(handle.keys(), file))
    return names


def tensor_refs(directory: Path) -> dict[str, TensorRef]:
    """Tensor name -> where it is and how to read it (each shard is opened once)."""
    handles = {}

    def loader(name: str, file: Path):
        def load():
            if file not in handles:
                handles[file] = _open(file)
            try:
                return handles[file].get_tensor(name)
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(file, f"cannot read tensor {name!r} ({exc})") from None

        return TensorRef(file, load)

    return {name: loader(name, file) for name, file in safetensors_files(directory).items()}


def _open(file: Path):
    try:
        return safe_open(file, framework="pt")
    except Exception as exc:
        raise CheckpointError(file, f"not a readable safetensors file ({exc})") from None


def eos_token_ids(directory: Path) -> set[int]:
    ids: set[int] = set()
    for file in (CONFIG, GENERATION_CONFIG):
        if (directory / file).exists():
            ids |= _as_ids(directory / file, read_json(directory / file).get("eos_token_id"))
    return ids


def _as_ids(path: Path, value) -> set[int]:
    if value is None:
        return set()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(path, f"field 'eos_token_id' must be an int or a list of ints, got {value!r}")
    return set(values)


def load_tokenizer(directory: Path):
    """A transformers tokenizer, or None when the directory has no tokenizer files."""
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        raise CheckpointError(directory, f"cannot load the tokenizer ({exc})") from None
