"""Triton GPU kernels: paged attention (decode and prefill), fused KV-cache write, int4/int8
weight-only dequant-matmul. Imported only when CUDA is in use (or by the tests, which run
them on CPU tensors under TRITON_INTERPRET=1); triton is the `gpu` extra, not a core dependency.
"""
