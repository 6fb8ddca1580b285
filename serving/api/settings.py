"""`kvpilot serve` settings: one pydantic-settings object, from flags and `KVPILOT_*` env vars, built once."""

import re
from pathlib import Path
from typing import Any, Literal

from kvpilot.serving.contract import ENV_PREFIX, SERVE_SETTINGS, ServeSetting
from kvpilot.serving.default_model import DEFAULT_MODEL_NAME, default_model_path
from kvpilot.serving.engine.config import EngineConfig
from pydantic import Field, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9}
_SIZE_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "t": 1e12, "tb": 1e12}
_SIZE_UNITS |= {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}  # Kubernetes quantities


def parse_bytes(value: int | str) -> int:
    """`1073741824`, `1GiB`, `512MiB`, `2G`, `2Gi` (a Kubernetes quantity) -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 2GiB, 512MiB or a number of bytes, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _field(setting: ServeSetting) -> tuple[Any, Any]:
    """A pydantic field for a declared setting: its type (a Literal of its choices), default, bound."""
    annotation: Any = Literal[setting.choices] if setting.choices else setting.type
    if setting.default is None:
        annotation = annotation | None
    return annotation, Field(setting.default, ge=setting.minimum, description=setting.help)


# One field per `contract.SERVE_SETTINGS` entry, nothing written twice.
_DeclaredSettings = create_model(
    "_DeclaredSettings", __base__=BaseSettings, **{s.name: _field(s) for s in SERVE_SETTINGS}
)


class ServeSettings(_DeclaredSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", protected_namespaces=()
    )

    @field_validator("kv_cache_memory", "max_request_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value: int | str | None) -> int | None:
        return value if value is None else parse_bytes(value)

    @field_validator("tensor_parallel_size")
    @classmethod
    def _single_device(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only 1 is supported (one device per replica), got {value}")
        return value

    @field_validator("inject_error_rate")
    @classmethod
    def _a_fraction(cls, value: float) -> float:
        if value > 1:
            raise ValueError(f"must be a fraction between 0 and 1, got {value}")
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
        engine = {s.engine_field: getattr(self, s.name) for s in SERVE_SETTINGS if s.engine_field}
        return engine | {"model": model}

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
