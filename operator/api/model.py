"""The optional parts of `spec.model` for running on a GPU cluster: a shared download cache and
the model's architecture (what the memory fit estimate needs; the operator never downloads a model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvpilot.operator.api.base import _Model
from kvpilot.operator.api.validation import Quantity, Rule, cel_rules, enforce
from pydantic import ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

AccessMode = Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]


class ModelCacheSpec(_Model):
    """A PersistentVolumeClaim the model is downloaded into once (per model and revision) by a
    Job; the engine pods mount it read-only."""

    storage_class_name: str | None = Field(
        default=None, max_length=253, description="StorageClass of the claim (default: the cluster's)."
    )
    size: Quantity = Field(description="Size of the claim, e.g. 100Gi (the model's files fit in it).")
    access_mode: AccessMode = Field(
        default="ReadWriteMany",
        description="Access mode of the claim: ReadWriteMany (or ReadOnlyMany) lets replicas on "
        "several nodes share it; ReadWriteOnce keeps every replica on one node.",
    )


@dataclass(frozen=True)
class ModelShape:
    """What the fit estimate needs of a model: its config.json's sizes (Hugging Face names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    qk_norm: bool = False  # Qwen3: a head_dim RMSNorm on q and on k in every layer


# A few architectures by name, from their published config.json, so a manifest can say
# `architecture: {known: Qwen3-32B}` instead of copying eight numbers.
KNOWN_ARCHITECTURES: dict[str, ModelShape] = {
    "Llama-3-8B": ModelShape(4096, 32, 32, 8, 128, 14336, 128256, False, 8192),
    "Llama-3.1-8B": ModelShape(4096, 32, 32, 8, 128, 14336, 128256, False, 131072),
    "Llama-3-70B": ModelShape(8192, 80, 64, 8, 128, 28672, 128256, False, 8192),
    "Qwen3-8B": ModelShape(4096, 36, 32, 8, 128, 12288, 151936, False, 40960, qk_norm=True),
    "Qwen3-32B": ModelShape(5120, 64, 64, 8, 128, 25600, 151936, False, 40960, qk_norm=True),
    "SmolLM2-135M": ModelShape(576, 30, 9, 3, 64, 1536, 49152, True, 8192),
}

_REQUIRED_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"
)  # fmt: skip
_REQUIRED = tuple(to_camel(name) for name in _REQUIRED_FIELDS)


def _required_given(arch: ModelArchitecture) -> str:
    given = [getattr(arch, name) is not None for name in _REQUIRED_FIELDS]
    return "all" if all(given) else "some" if any(given) else "none"


ARCHITECTURE_RULES = [
    Rule(
        "has(self.known) ? !("
        + " || ".join(f"has(self.{name})" for name in _REQUIRED)
        + ") : ("
        + " && ".join(f"has(self.{name})" for name in _REQUIRED)
        + ")",
        "spec.model.architecture: set either known or all of " + ", ".join(_REQUIRED),
        ".known",
        lambda arch: _required_given(arch) == ("none" if arch.known else "all"),
    ),
]


class ModelArchitecture(_Model):
    """The model's shape for the memory fit estimate: a known architecture, or the sizes from its
    config.json (same names, camelCase)."""

    model_config = ConfigDict(json_schema_extra=cel_rules(ARCHITECTURE_RULES))

    known: Literal[tuple(KNOWN_ARCHITECTURES)] | None = Field(  # type: ignore[valid-type]
        default=None, description="A known architecture: " + ", ".join(KNOWN_ARCHITECTURES) + "."
    )
    hidden_size: int | None = Field(default=None, ge=1, le=1 << 20, description="config.json hidden_size.")
    num_hidden_layers: int | None = Field(default=None, ge=1, le=4096, description="num_hidden_layers.")
    num_attention_heads: int | None = Field(default=None, ge=1, le=4096, description="num_attention_heads.")
    num_key_value_heads: int | None = Field(
        default=None, ge=1, le=4096, description="num_key_value_heads (default: numAttentionHeads)."
    )
    head_dim: int | None = Field(
        default=None, ge=1, le=4096, description="head_dim (default: hiddenSize / numAttentionHeads)."
    )
    intermediate_size: int | None = Field(default=None, ge=1, le=1 << 22, description="intermediate_size.")
    vocab_size: int | None = Field(default=None, ge=1, le=1 << 24, description="vocab_size.")
    tie_word_embeddings: bool = Field(default=False, description="tie_word_embeddings.")
    max_position_embeddings: int | None = Field(
        default=None, ge=1, le=1 << 24, description="max_position_embeddings (the longest sequence)."
    )

    @model_validator(mode="after")
    def _check_rules(self) -> ModelArchitecture:
        return enforce(self, ARCHITECTURE_RULES)

    def shape(self) -> ModelShape:
        if self.known is not None:
            return KNOWN_ARCHITECTURES[self.known]
        heads = self.num_attention_heads
        return ModelShape(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=self.num_key_value_heads or heads,
            head_dim=self.head_dim or self.hidden_size // heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
        )
