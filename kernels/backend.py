"""The one place that picks kernels for a device: Triton on CUDA, torch/fbgemm on CPU.

Every device-dependent op of the model goes through `select_backend(device)`: writing K/V into
the paged cache, paged attention, and matmuls with quantized weights. Nothing else checks the
device.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelBackend:
    name: str
    write_kv_cache: Callable[..., None]  # (k, v, k_cache, v_cache, slot_mapping)
    paged_attention: Callable[..., torch.Tensor]  # (q, k_cache, v_cache, metadata, scale)
    quantized_linear: Callable[..., torch.Tensor]  # (x, quantized weight) -> x @ W^T


def select_backend(device: torch.device | str) -> KernelBackend:
    return _backend(torch.device(device).type)


@functools.cache
def _backend(device_type: str) -> KernelBackend:
    if device_type == "cuda":
        try:
            from kvpilot.kernels.triton.backend import TRITON_BACKEND
        except ImportError as error:  # triton is the `gpu` extra
            raise RuntimeError(
                f"CUDA tensors need Triton kernels: pip install 'kvpilot[gpu]' ({error})"
            ) from error
        return TRITON_BACKEND
    from kvpilot.kernels.attention import paged_attention_cpu, write_kv_cache_cpu

    return KernelBackend("cpu", write_kv_cache_cpu, paged_attention_cpu, lambda x, weight: weight.linear(x))
