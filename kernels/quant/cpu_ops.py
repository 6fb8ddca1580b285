"""CPU building blocks shared by the quantized formats: dequantize-and-multiply in row chunks."""

from collections.abc import Callable

import torch

# Rows dequantized per step: ~256K float32 values (1 MiB) stay in L2 while the matmul reads them.
CHUNK_ELEMENTS = 1 << 18


def linear_by_row_chunks(
    x: torch.Tensor, num_rows: int, row_width: int, dequantize_rows: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """x @ W^T where W is only ever materialized `rows` at a time by `dequantize_rows(start, stop)`.

    `dequantize_rows` returns a float [stop - start, in_features] block (any strides); the full
    float weight never exists, so memory stays at the quantized size plus one small chunk.
    """
    rows = max(1, CHUNK_ELEMENTS // max(row_width, 1))
    out = torch.empty(x.shape[0], num_rows, dtype=x.dtype, device=x.device)
    for start in range(0, num_rows, rows):
        stop = min(start + rows, num_rows)
        torch.mm(x, dequantize_rows(start, stop).t(), out=out[:, start:stop])
    return out


def flatten_tokens(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """[..., in] -> ([T, in], leading shape) so every op below works on 2-D inputs."""
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])
