"""The router's configuration file: the contract between the operator (which renders it into a
ConfigMap) and `kvpilot router` (which loads it, and reloads it when the file changes).

Imports only pydantic and PyYAML: the operator imports this module to validate what it renders.

```yaml
models:
- name: smollm2                 # the `model` clients send
  revisions:
  - name: stable
    weight: 90                  # share of new requests among revisions with a ready endpoint
    endpoints: [http://10.0.0.5:8000, http://10.0.0.6:8000]
  - name: canary
    weight: 10
    service: http://smollm2-canary:8000   # instead of endpoints: one address (a Service)
  balancing: prefix             # prefix | least-request | random
  activation: {timeout: 300s, maxQueued: 1000}
tenants:                        # absent: no auth
- name: team-a
  keySha256: 9f86d0...          # or keyFile: /etc/kvpilot/keys/team-a
  models: [smollm2]             # absent: all models
  requestsPerMinute: 600
  tokensPerMinute: 200000
upstreamApiKeyFile: /etc/kvpilot/upstream/key   # the key the router sends to the servers
```
"""

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

BALANCING_POLICIES = ("prefix", "least-request", "random")
DEFAULT_ACTIVATION_TIMEOUT = 300.0
DEFAULT_MAX_QUEUED = 1000

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field (`models[0].revisions[1].weight: ...`)."""


def parse_duration(value: object) -> float:
    """Seconds from `300s`, `5m`, `1h`, `250ms` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 300s or 5m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"expected a duration such as 300s, 5m or 250ms, got {value!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s)://host[:port] URL, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    return url.rstrip("/")


EndpointURL = Annotated[str, BeforeValidator(lambda value: _check_url(str(value)))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class Activation(_Model):
    """Scale from zero: requests for a model with no ready endpoint wait here."""

    timeout: Duration = DEFAULT_ACTIVATION_TIMEOUT  # seconds a request is held before 503
    max_queued: int = Field(DEFAULT_MAX_QUEUED, ge=0)  # held requests before 429


class Revision(_Model):
    name: str = Field(min_length=1)
    weight: int = Field(100, ge=0)  # 0 drains the revision
    endpoints: list[EndpointURL] = Field(default_factory=list)  # empty: scaled to zero
    service: EndpointURL | None = None  # one address (a Service) instead of endpoints

    @model_validator(mode="after")
    def _one_source(self) -> "Revision":
        if self.service is not None and self.endpoints:
            raise ValueError("set endpoints or service, not both")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError(f"endpoints are listed twice: {sorted(self.endpoints)}")
        return self

    @property
    def addresses(self) -> list[str]:
        return [self.service] if self.service is not None else list(self.endpoints)


class ModelRoute(_Model):
    name: str = Field(min_length=1)
    revisions: list[Revision] = Field(min_length=1)
    balancing: Literal["prefix", "least-request", "random"] = "prefix"
    activation: Activation = Field(default_factory=Activation)

    @field_validator("revisions")
    @classmethod
    def _unique_revisions(cls, revisions: list[Revision]) -> list[Revision]:
        _check_unique("revision", [revision.name for revision in revisions])
        return revisions


class Tenant(_Model):
    name: str = Field(min_length=1)
    key_sha256: str | None = None  # hex sha256 of the key
    key_file: str | None = None  # a file holding the key (a mounted Secret); hashed at load
    models: list[str] | None = None  # absent: every model
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)

    @field_validator("key_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_HEX.match(value.lower()):
            raise ValueError("expected 64 hexadecimal characters (the sha256 of the key)")
        return None if value is None else value.lower()

    @model_validator(mode="after")
    def _one_key(self) -> "Tenant":
        if (self.key_sha256 is None) == (self.key_file is None):
            raise ValueError("set exactly one of keySha256 and keyFile")
        return self


class RouterConfig(_Model):
    models: list[ModelRoute] = Field(min_length=1)
    tenants: list[Tenant] | None = None  # absent: no auth
    upstream_api_key_file: str | None = None

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[ModelRoute]) -> list[ModelRoute]:
        _check_unique("model", [model.name for model in models])
        return models

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, tenants: list[Tenant] | None) -> list[Tenant] | None:
        _check_unique("tenant", [tenant.name for tenant in tenants or ()])
        return tenants

    def model(self, name: str) -> ModelRoute | None:
        return next((model for model in self.models if model.name == name), None)


def _check_unique(kind: str, names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{kind} names must be unique: {', '.join(repeated)} repeated")


def field_path(loc: tuple) -> str:
    """pydantic's location as the YAML reader sees it: `models[0].revisions[1].weight`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith(("function-", "literal[")):
            path += f".{part}" if path else part
    return path


def error_line(error: ValidationError) -> str:
    """The first problem, naming its field."""
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    path = field_path(first.get("loc", ()))
    return f"{path}: {message}" if path else message


def parse_config(text: str, source: str = "config") -> RouterConfig:
    """Validate YAML text; raises `ConfigError` naming the field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with `models:`, got {type(data).__name__}")
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {error_line(exc)}") from None


def load_config(path: str | Path) -> RouterConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, str(path))


def hash_key(key: str) -> str:
    """The hex sha256 of a key, as `keySha256` holds it."""
    return hashlib.sha256(key.encode()).hexdigest()


def read_key_file(path: str, field: str) -> str:
    """A key from a mounted Secret file, surrounding whitespace (a trailing newline) stripped."""
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None
    if not key:
        raise ConfigError(f"{field}: {path} is empty")
    return key


def tenant_key_hashes(config: RouterConfig) -> dict[str, str]:
    """{sha256 of key: tenant name}, reading keyFile tenants' files; keys are never kept."""
    hashes: dict[str, str] = {}
    for index, tenant in enumerate(config.tenants or ()):
        if tenant.key_sha256 is not None:
            digest = tenant.key_sha256
        else:
            digest = hash_key(read_key_file(tenant.key_file, f"tenants[{index}].keyFile"))
        if digest in hashes:
            raise ConfigError(f"tenants[{index}]: same key as tenant {hashes[digest]!r}")
        hashes[digest] = tenant.name
    return hashes
