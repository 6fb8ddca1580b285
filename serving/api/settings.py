"""`kvpilot serve` settings: one pydantic-settings object, from flags and `KVPILOT_*` env vars, built once."""

import re
from pathlib import Path
from typing import Literal

from kvpilot.serving.contract import DEFAULT_PORT, ENV_PREFIX, KV_CACHE_DTYPES, QUANTIZATION_MODES
from kvpilot.serving.default_model import DEFAULT_MODEL_NAME, default_model_path
from kvpilot.serving.engine.config import DTYPES, EngineConfig
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9}
_SIZE_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(value: int | str) -> int:
    """`1073741824`, `1GiB`, `512MiB`, `2G` -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 2GiB, 512MiB or a number of bytes, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", protected_namespaces=()
    )

    model: str | None = None  # checkpoint directory or .gguf file; None: the bundled default model
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int = Field(512, gt=0)
    max_model_len: int | None = Field(None, gt=0)
    enable_prefix_caching: bool = True
    max_queue_len: int = Field(256, ge=0)  # requests waiting for a slot; more get 429
    shutdown_timeout: float = Field(30.0, ge=0)
    api_key: str | None = None
    access_log: bool = True  # uvicorn's one line per HTTP request
    block_size: int = Field(16, gt=0)
    num_kv_blocks: int | None = Field(None, gt=0)
    kv_cache_memory: int = Field(1 << 30, gt=0)  # bytes; flags accept 2GiB, 512MiB, ...
    dtype: Literal[DTYPES] = "float32"
    quantization: Literal[QUANTIZATION_MODES] = "none"
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = "auto"
    tensor_parallel_size: int = 1
    seed: int = 0

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _parse_size(cls, value: int | str) -> int:
        return parse_bytes(value)

    @field_validator("tensor_parallel_size")
    @classmethod
    def _single_device(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only 1 is supported (one device per replica), got {value}")
        return value

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).exists():
            raise ValueError(f"no such checkpoint directory or .gguf file: {value}")
        return value

    @model_validator(mode="after")
    def _engine_config_is_valid(self) -> "ServeSettings":
        EngineConfig(**self._engine_kwargs("unused"))  # raises ValueError("field: message")
        return self

    def _engine_kwargs(self, model: str) -> dict:
        return dict(
            model=model,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory_bytes=self.kv_cache_memory,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            dtype=self.dtype,
            quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
            seed=self.seed,
        )

    @property
    def model_path(self) -> str:
        return self.model if self.model is not None else str(default_model_path())

    @property
    def model_name(self) -> str:
        """The name clients send as `model` (and the metrics' `model_name` label)."""
        if self.served_model_name:
            return self.served_model_name
        return self.model if self.model is not None else DEFAULT_MODEL_NAME

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self._engine_kwargs(self.model_path))
