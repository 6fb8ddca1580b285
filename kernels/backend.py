"""The one place that picks kernels for a device: Triton on CUDA, torch/fbgemm on CPU.

Every device-dependent op of the model goes through `select_backend(device)`: writing K/V into
the paged cache, paged attention, the layout a float weight is kept in for matmuls (oneDNN's
pre-packed one on CPU), matmuls with weights that are not plain tensors, and the layers' row-wise
float32 ops (RMSNorm, SiLU-and-multiply, RoPE, the greedy argmax; native on CPU). Nothing else checks
the device.
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
    quantized_linear: Callable[..., torch.Tensor]  # (x, quantized or packed weight) -> x @ W^T
    prepare_linear_weight: Callable[..., object]  # float weight -> what `Linear` keeps (once, at load)
    rms_norm: Callable[..., torch.Tensor]  # (x, weight, eps)
    add_rms_norm: Callable[..., torch.Tensor]  # (x, delta, weight, eps): x += delta, then its norm
    silu_and_mul: Callable[..., torch.Tensor]  # ([..., 2n] gate and up) -> [..., n]
    rotary: Callable[..., torch.Tensor]  # (x [T, heads, dim], positions, cos, signed_sin) -> rotated
    argmax_rows: Callable[..., torch.Tensor]  # [rows, n] -> int64 [rows], as `argmax(dim=-1)`


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
    from kvpilot.kernels.packed_float import can_pack, pack_float_weight
    from kvpilot.kernels.row_ops import (
        add_rms_norm_cpu,
        argmax_rows_cpu,
        rms_norm_cpu,
        rotary_cpu,
        silu_and_mul_cpu,
    )

    return KernelBackend(
        "cpu",
        write_kv_cache_cpu,
        paged_attention_cpu,
        lambda x, weight: weight.linear(x),
        lambda weight: pack_float_weight(weight) if can_pack(weight) else weight,
        rms_norm_cpu,
        add_rms_norm_cpu,
        silu_and_mul_cpu,
        rotary_cpu,
        argmax_rows_cpu,
    )
