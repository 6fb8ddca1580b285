"""Attention over the paged KV cache.

Per layer, K and V live in caches indexed [num_blocks, block_size, num_kv_heads, head_dim] (stored
head-major within a block, see `kernels.quant.kv_cache`); a token at position `pos` of a sequence
sits in slot `block_table[pos // block_size] * block_size + pos % block_size`.

One step's batch is flat: T query tokens from B sequences (prefill chunks and decodes in any
mix), sequence i owning rows [query_start_loc[i], query_start_loc[i + 1]). Its queries sit at
positions [context_lens[i], seq_lens[i]) and attend causally to keys [0, query position]. The
chunk's own K/V are written to the cache before attention runs, so every key comes from the cache.

`paged_attention` and `write_kv_cache` dispatch through `kvpilot.kernels.backend` (the fast CPU
path here, Triton kernels for CUDA tensors). Caches are tensors in the model dtype, or `KVCache`
objects (int8/fp8, quantized on write) that dequantize when indexed by block ids.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kvpilot.kernels import cpu_extension
from kvpilot.kernels.backend import select_backend
from kvpilot.kernels.quant.kv_cache import KVCache, split_slots


@dataclass(frozen=True)
class AttentionMetadata:
    """Built once per step by the model runner; shared by every layer."""

    positions: torch.Tensor  # [T] int64: absolute position of each query token
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each query token
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step (context + query)
    context_lens: torch.Tensor  # [B] int32: tokens cached before this step
    block_size: int
    max_seq_len: int
    max_query_len: int
    # Host copies: the CPU path loops over prefill sequences without reading tensors back.
    query_lens_list: list[int]
    seq_lens_list: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for a batch, with slot_mapping computed without a per-token Python loop (on the
    CPU; the tensors are then moved to `device`)."""
    num_seqs = len(query_lens)
    query_lens_t = torch.tensor(query_lens, dtype=torch.int64)
    context_lens_t = torch.tensor(context_lens, dtype=torch.int64)
    seq_lens_t = query_lens_t + context_lens_t
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int64)
    torch.cumsum(query_lens_t, 0, out=query_start_loc[1:])
    max_blocks = max(len(table) for table in block_tables)
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int64)

    num_tokens = int(query_start_loc[-1])
    seq_index = torch.repeat_interleave(torch.arange(num_seqs), query_lens_t)
    offsets = torch.arange(num_tokens) - query_start_loc[:-1][seq_index]
    positions = context_lens_t[seq_index] + offsets
    slot_mapping = tables[seq_index, positions // block_size] * block_size + positions % block_size
    seq_lens_list = seq_lens_t.tolist()
    return AttentionMetadata(
        positions=positions.to(device),
        slot_mapping=slot_mapping.to(device),
        block_tables=tables.to(device),
        query_start_loc=query_start_loc.to(device),
        seq_lens=seq_lens_t.to(device),
        context_lens=context_lens_t.to(device),
        block_size=block_size,
        max_seq_len=max(seq_lens_list),
        max_query_len=max(query_lens),
        query_lens_list=list(query_lens),
        seq_lens_list=seq_lens_list,
    )


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's k/v [T, num_kv_heads, head_dim] into their cache slots."""
    select_backend(k.device).write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def write_kv_cache_cpu(
    k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, slot_mapping: torch.Tensor
) -> None:
    if all(cpu_extension.supports_f32_write(x, cache) for x, cache in ((k, k_cache), (v, v_cache))):
        cpu_extension.write_kv_f32(k, v, k_cache, v_cache, slot_mapping)
        return
    for x, cache in ((k, k_cache), (v, v_cache)):
        if isinstance(cache, KVCache):  # int8/fp8 storage: quantized on write
            if cpu_extension.supports_int8_write(x, cache):
                cpu_extension.write_kv_int8(x, cache, slot_mapping)
            else:
                cache.write(x, slot_mapping)
        else:
            blocks, offsets = split_slots(slot_mapping, cache.shape[1])
            cache[blocks, offsets] = x.to(cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[seq_len, num_kv_heads, head_dim]: one sequence's keys or values in position order."""
    num_blocks = -(-seq_len // cache.shape[1])
    return cache[block_table[:num_blocks]].flatten(0, 1)[:seq_len]


def paged_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The definition: per sequence and head, softmax(q k^T * scale + causal mask) v, in float32."""
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    for i in range(metadata.num_seqs):
        start, end = int(metadata.query_start_loc[i]), int(metadata.query_start_loc[i + 1])
        seq_len, context_len = int(metadata.seq_lens[i]), int(metadata.context_lens[i])
        keys = gather_kv(k_cache, metadata.block_tables[i], seq_len).float()
        values = gather_kv(v_cache, metadata.block_tables[i], seq_len).float()
        group = num_heads // keys.shape[1]
        query_pos = torch.arange(context_len, seq_len)[:, None]
        visible = torch.arange(seq_len)[None, :] <= query_pos
        for h in range(num_heads):
            scores = q[start:end, h].float() @ keys[:, h // group].T * scale
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[start:end, h] = (probs @ values[:, h // group]).to(q.dtype)
    return out


# Chunks of at most this many queries (decodes, and decodes with draft tokens to verify) run as
# one decode row per query: each attends to its own prefix of the same block table.
MAX_DECODE_QUERY_LEN = 16


def paged_attention_cpu(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Decode rows all at once (native kernel, or one padded SDPA); each longer chunk in one SDPA."""
    query_lens = metadata.query_lens_list
    if all(n == 1 for n in query_lens):  # a pure decode step: rows are already the sequences
        return _decode(
            q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, metadata.block_size, scale
        )
    out = torch.empty_like(q)
    starts = metadata.query_start_loc.tolist()
    short = [i for i, n in enumerate(query_lens) if n <= MAX_DECODE_QUERY_LEN]
    if short:
        rows = [starts[i] + j for i in short for j in range(query_lens[i])]
        seqs = [i for i in short for _ in range(query_lens[i])]
        seq_lens = [
            metadata.seq_lens_list[i] - query_lens[i] + j + 1 for i in short for j in range(query_lens[i])
        ]
        tables = metadata.block_tables[seqs]
        rows_t = torch.tensor(rows)
        out[rows_t] = _decode(
            q[rows_t], k_cache, v_cache, tables, torch.tensor(seq_lens), metadata.block_size, scale
        )
    for i, query_len in enumerate(query_lens):
        if query_len <= MAX_DECODE_QUERY_LEN:
            continue
        seq_len = metadata.seq_lens_list[i]
        start, context_len = starts[i], seq_len - query_len
        # 4-D [1, heads, len, dim]: SDPA's flash CPU kernel; 3-D inputs take its ~10x slower math path.
        keys = gather_kv(k_cache, metadata.block_tables[i], seq_len).to(q.dtype).transpose(0, 1)[None]
        values = gather_kv(v_cache, metadata.block_tables[i], seq_len).to(q.dtype).transpose(0, 1)[None]
        queries = q[start : start + query_len].transpose(0, 1)[None]
        if context_len == 0:
            mask, causal = None, True
        else:
            query_pos = torch.arange(context_len, seq_len)[:, None]
            mask, causal = _additive_mask(torch.arange(seq_len)[None, :] <= query_pos, q.dtype), False
        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
        out[start : start + query_len] = attended[0].transpose(0, 1)
    return out


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One query per row, row i attending to keys [0, seq_lens[i]) of block_tables[i].
    float32 or int8 caches: the native kernel reads K/V in place (no gather copy, no padding)."""
    if cpu_extension.supports(q, k_cache):
        return cpu_extension.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return _decode_batch(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale)


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [D, num_heads, head_dim], one query per row -> [D, num_heads, head_dim]."""
    num_seqs, num_heads, head_dim = q.shape
    max_len = int(seq_lens.max())
    num_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_blocks]
    keys = k_cache[tables].flatten(1, 2)[:, :max_len].to(q.dtype).transpose(1, 2)  # [D, kv_heads, L, dim]
    values = v_cache[tables].flatten(1, 2)[:, :max_len].to(q.dtype).transpose(1, 2)
    # The query heads sharing a KV head become that head's query rows: SDPA without GQA expansion.
    queries = q.view(num_seqs, keys.shape[1], num_heads // keys.shape[1], head_dim)
    mask = _additive_mask((torch.arange(max_len)[None, :] < seq_lens[:, None])[:, None, None, :], q.dtype)
    attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return attended.reshape(num_seqs, num_heads, head_dim)


def _additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, -inf elsewhere (SDPA's CPU kernel is much slower with boolean masks)."""
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, num_heads, head_dim] -> [T, num_heads, head_dim]; the batch's K/V are already cached."""
    return select_backend(q.device).paged_attention(q, k_cache, v_cache, metadata, scale)
