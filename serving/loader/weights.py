"""The one place where checkpoint tensors become model weights (float or quantized).

A loader hands `WeightBuilder` its tensors by Hugging Face name, each either a float tensor or a
GGUF tensor as stored; the model asks for each weight by name and kind (linear, embedding,
vector), and `WeightQuantizer` decides the format for the configured quantization mode.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from kvpilot.kernels.quant.loading import Source, WeightQuantizer, permute_rows
from kvpilot.serving.loader.errors import CheckpointError
from kvpilot.serving.models.layers import Weight


@dataclass(frozen=True)
class TensorRef:
    file: Path  # where the tensor is stored, for error messages
    load: Callable[[], Source]


class WeightBuilder:
    def __init__(
        self,
        file: object,
        tensors: Mapping[str, TensorRef],
        quantizer: WeightQuantizer,
        row_permutations: Mapping[str, torch.Tensor] | None = None,
    ):
        self.file = file
        self.tensors = tensors
        self.quantizer = quantizer
        self.row_permutations = row_permutations or {}
        # norms and biases
        self.as_float = WeightQuantizer("none", dtype=quantizer.dtype, device=quantizer.device)

    def linear(self, name: str, shape: tuple[int, int], exact_activations: bool = False) -> Weight:
        return self._permuted(name, self.quantizer.linear(self._source(name, shape), exact_activations))

    def head(self, name: str, shape: tuple[int, int]) -> Weight:
        return self.quantizer.head(self._source(name, shape))

    def tied_head(self, name: str, shape: tuple[int, int], table: Weight) -> Weight:
        return self.quantizer.tied_head(self._source(name, shape), table)

    def embedding(self, name: str, shape: tuple[int, int]) -> Weight:
        return self.quantizer.embedding(self._source(name, shape))

    def vector(self, name: str, size: int) -> torch.Tensor:
        return self._permuted(name, self.as_float.linear(self._source(name, (size,))))

    def _source(self, name: str, shape: tuple[int, ...]) -> Source:
        if name not in self.tensors:
            raise CheckpointError(self.file, f"missing tensor {name!r}")
        ref = self.tensors[name]
        source = ref.load()
        # GGUF lists dimensions innermost first; torch outermost first.
        dims = source.shape if isinstance(source, torch.Tensor) else reversed(source.shape)
        actual = [int(n) for n in dims]
        if actual != list(shape):
            raise CheckpointError(ref.file, f"tensor {name!r} has shape {actual}, expected {list(shape)}")
        return source

    def _permuted(self, name: str, weight: Weight) -> Weight:
        index = self.row_permutations.get(name)
        return weight if index is None else permute_rows(weight, index)
