"""Load-time policy: which format each weight gets for a `--quantization` mode.

- Linear weights take the mode's format: int8 (per-output-channel), w8a8 (the same weights,
  activations quantized per token at run time, except for layers marked `exact_activations`:
  the q/k/v and down projections), int4 (group-wise, `group_size`, default 32) or
  fp8 (per-channel). A GGUF tensor whose blocks already are that
  format loads byte for byte (Q4_0/Q4_1 -> int4 with group 32, Q8_0 -> int8 with group 32);
  any other tensor goes through float once, and the summary says so.
- Embedding tables are never quantized further: float stays float, and a GGUF Q8_0/Q4_0/Q4_1
  table keeps its exact block format (smaller and lossless). A tied lm_head shares the table,
  except in w8a8, where a block table's head (the largest matmul of a decode step) gets its own
  per-channel copy for fbgemm. The head's activations always stay float: its error lands
  straight on the logits.
- Mode "none" is float everywhere (GGUF blocks are dequantized).
"""

from collections import Counter

import gguf
import numpy as np
import torch
from kvpilot.kernels.quant.gguf_blocks import BLOCK_FORMAT, from_gguf_tensor
from kvpilot.kernels.quant.quantize import DEFAULT_GROUP_SIZE, QuantizedWeight, quantize
from kvpilot.serving.contract import QUANTIZATION_MODES

FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)

Weight = torch.Tensor | QuantizedWeight
Source = torch.Tensor | gguf.ReaderTensor  # a float tensor ([out, in]) or a GGUF tensor as stored


class WeightQuantizer:
    """Turns checkpoint tensors into the weights a model runs with; counts what it did."""

    def __init__(
        self,
        mode: str,
        group_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if mode not in QUANTIZATION_MODES:
            raise ValueError(f"quantization: unknown mode {mode!r}, expected one of {QUANTIZATION_MODES}")
        if group_size is not None and mode != "int4":
            raise ValueError(f"quantization: a group size only applies to int4, not {mode!r}")
        self.mode = mode
        self.group_size = group_size or (DEFAULT_GROUP_SIZE if mode == "int4" else None)
        self.dtype = dtype
        self.device = torch.device(device)
        self.counts: Counter[str] = Counter()

    def linear(self, source: Source, exact_activations: bool = False) -> Weight:
        """A linear layer's [out, in] weight. exact_activations: in w8a8, keep this layer's
        activations float (int8 weight-only), e.g. for the q/k/v projections, whose K/V are
        quantized again into an int8 KV cache (the two errors compound: +3% perplexity)."""
        if self.mode == "none":
            return self._float(source)
        if isinstance(source, gguf.ReaderTensor) and self._loads_exactly(source.tensor_type):
            self.counts[f"{source.tensor_type.name} kept as {self.mode}"] += 1
            return self._on_device(from_gguf_tensor(source))
        mode = "int8" if self.mode == "w8a8" and exact_activations else self.mode
        self.counts[f"{_kind(source)} quantized to {mode}"] += 1
        return quantize(self._float(source, count=False).float(), mode, self._target_group_size())

    def head(self, source: Source) -> Weight:
        """The output head [vocab, hidden]; in w8a8, per-channel int8 with float activations."""
        if self.mode != "w8a8":
            return self.linear(source)
        self.counts["output head quantized to int8 (float activations)"] += 1
        return quantize(self._float(source, count=False).float(), "int8")

    def tied_head(self, source: Source, table: Weight) -> Weight:
        """The head of a tied checkpoint: the table itself, unless w8a8 would otherwise run it by
        dequantizing a block table every step."""
        return self.head(source) if self.mode == "w8a8" and not isinstance(table, torch.Tensor) else table

    def embedding(self, source: Source) -> Weight:
        """An embedding table [vocab, hidden] (also the lm_head when tied)."""
        qtype = source.tensor_type if isinstance(source, gguf.ReaderTensor) else None
        if self.mode != "none" and qtype in BLOCK_FORMAT:
            self.counts[f"{qtype.name} embedding kept as {BLOCK_FORMAT[qtype]}"] += 1
            return self._on_device(from_gguf_tensor(source))
        return self._float(source)

    def summary(self) -> str:
        """One log line: what happened to the weights (e.g. '210 Q4_1 kept as int4, ...')."""
        return ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items())) or "no weights"

    def _loads_exactly(self, qtype: gguf.GGMLQuantizationType) -> bool:
        fmt = BLOCK_FORMAT.get(qtype)
        if fmt == "int4":
            return self.mode == "int4" and self.group_size == 32
        return fmt == "int8" and self.mode == "int8"  # w8a8 requantizes per channel, for fbgemm

    def _target_group_size(self) -> int | None:
        return self.group_size if self.mode == "int4" else None

    def _on_device(self, weight: QuantizedWeight) -> QuantizedWeight:
        return weight if self.device.type == "cpu" else weight.to(self.device)

    def _float(self, source: Source, count: bool = True) -> torch.Tensor:
        """On the target device, so quantization from float happens there too."""
        if isinstance(source, torch.Tensor):
            return source.to(self.device, self.dtype)
        if count and source.tensor_type not in FLOAT_TYPES:
            self.counts[f"{source.tensor_type.name} dequantized to float"] += 1
        values = gguf.quants.dequantize(source.data, source.tensor_type)
        shape = tuple(int(n) for n in reversed(source.shape))  # GGML lists dimensions innermost first
        values = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file is read-only
        return values.reshape(shape).to(self.device, self.dtype)


def check_checkpoint_config(config: dict, mode: str, file: object = "config.json") -> None:
    """A Hugging Face checkpoint that is already quantized (GPTQ, AWQ, bitsandbytes, fp8, ...) has
    no float weights to quantize: fail at start-up instead of loading something else."""
    settings = config.get("quantization_config")
    if settings:
        method = settings.get("quant_method", "unknown") if isinstance(settings, dict) else settings
        raise ValueError(
            f"quantization: {file} is already quantized with {method!r}, which kvpilot cannot load; "
            f"--quantization {mode} needs a float checkpoint (or a GGUF file)"
        )


def concat_rows(weights: list[Weight]) -> Weight | None:
    """One [sum(out), in] weight from several of the same format (q/k/v, gate/up), or None when
    their formats differ (e.g. a GGUF file that stores attn_v in more bits than attn_q)."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat(weights) if len({w.dtype for w in weights}) == 1 else None
    kinds = {type(w) for w in weights}
    return kinds.pop().concat_rows(weights) if len(kinds) == 1 else None


def permute_rows(weight: Weight, index: torch.Tensor) -> Weight:
    """Reorder output rows (e.g. GGUF's rotary permutation of q/k) in any format."""
    return weight[index] if isinstance(weight, torch.Tensor) else weight.select_rows(index)


def _kind(source: Source) -> str:
    return "float" if isinstance(source, torch.Tensor) else source.tensor_type.name
