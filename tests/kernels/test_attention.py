"""Paged attention: the fast CPU path against the reference, and the reference against plain attention."""

import pytest
import torch
from kvpilot.kernels import cpu_extension
from kvpilot.kernels.attention import (
    build_attention_metadata,
    paged_attention,
    paged_attention_cpu,
    paged_attention_reference,
    write_kv_cache,
)
from kvpilot.kernels.quant.kv_cache import kv_cache_tensor

HEAD_DIM = 16


def plain_causal_attention(q, k, v, scale):
    """q [L, heads, dim], k/v [L, kv_heads, dim] contiguous; a textbook causal softmax attention."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    length = q.shape[0]
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def random_batch(generator, block_size, num_heads, num_kv_heads, query_lens, context_lens, num_blocks=64):
    """Caches holding every sequence's K/V at its slots (blocks scattered at random), and queries."""
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, HEAD_DIM, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, HEAD_DIM, generator=generator)
    free = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for query_len, context_len in zip(query_lens, context_lens, strict=True):
        needed = -(-(query_len + context_len) // block_size)
        tables.append([free.pop() for _ in range(needed)])
    metadata = build_attention_metadata(query_lens, context_lens, tables, block_size)
    q = torch.randn(sum(query_lens), num_heads, HEAD_DIM, generator=generator)
    return q, k_cache, v_cache, metadata


@pytest.mark.parametrize("block_size", [16, 5, 1])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2), (4, 1)])
def test_cpu_path_matches_reference_on_mixed_batches(block_size, num_heads, num_kv_heads):
    generator = torch.Generator().manual_seed(block_size * 100 + num_heads * 10 + num_kv_heads)
    # decodes (query 1 with long context), fresh prefills, prefill chunks after prior context
    query_lens = [1, 7, 1, 20, 3, 1, 16, 1]
    context_lens = [30, 0, 5, 0, 17, 0, 33, 63]
    q, k_cache, v_cache, metadata = random_batch(
        generator, block_size, num_heads, num_kv_heads, query_lens, context_lens, num_blocks=200
    )
    expected = paged_attention_reference(q, k_cache, v_cache, metadata, scale=0.3)
    torch.testing.assert_close(paged_attention_cpu(q, k_cache, v_cache, metadata, 0.3), expected)
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, metadata, 0.3), expected)


@pytest.mark.parametrize("native", [True, False])
def test_short_chunks_run_as_decode_rows(native, monkeypatch):
    """Decodes with draft tokens (2..16 queries after a context) go through the decode path, one
    row per query; without the native kernel, through the padded SDPA fallback."""
    if not native:
        monkeypatch.setattr("kvpilot.kernels.cpu_extension.supports", lambda q, cache: False)
    generator = torch.Generator().manual_seed(11)
    query_lens, context_lens = [5, 1, 2, 16, 17], [12, 9, 0, 40, 3]
    q, k_cache, v_cache, metadata = random_batch(generator, 4, 6, 2, query_lens, context_lens, num_blocks=100)
    expected = paged_attention_reference(q, k_cache, v_cache, metadata, scale=0.3)
    torch.testing.assert_close(paged_attention_cpu(q, k_cache, v_cache, metadata, 0.3), expected)


def test_cpu_path_matches_reference_on_decode_only_batch():
    generator = torch.Generator().manual_seed(7)
    q, k_cache, v_cache, metadata = random_batch(generator, 4, 4, 2, [1] * 6, [0, 1, 3, 4, 11, 30])
    expected = paged_attention_reference(q, k_cache, v_cache, metadata, scale=0.25)
    torch.testing.assert_close(paged_attention_cpu(q, k_cache, v_cache, metadata, 0.25), expected)


@pytest.mark.parametrize("block_size", [16, 3])
@pytest.mark.parametrize("chunk_len", [37, 10, 1])
def test_chunked_paged_attention_equals_plain_causal_attention(block_size, chunk_len):
    """One sequence computed chunk by chunk through write_kv_cache + the paged cache gives the same
    rows as causal attention over the contiguous K/V, for both implementations."""
    generator = torch.Generator().manual_seed(block_size + chunk_len)
    length, num_heads, num_kv_heads = 37, 6, 3
    q = torch.randn(length, num_heads, HEAD_DIM, generator=generator)
    k = torch.randn(length, num_kv_heads, HEAD_DIM, generator=generator)
    v = torch.randn(length, num_kv_heads, HEAD_DIM, generator=generator)
    expected = plain_causal_attention(q, k, v, scale=HEAD_DIM**-0.5)

    num_blocks = 40
    table = torch.randperm(num_blocks, generator=generator)[: -(-length // block_size)].tolist()
    caches = {name: torch.zeros(num_blocks, block_size, num_kv_heads, HEAD_DIM) for name in ("k", "v")}
    for attention in (paged_attention_reference, paged_attention_cpu):
        rows = []
        for start in range(0, length, chunk_len):
            end = min(start + chunk_len, length)
            metadata = build_attention_metadata([end - start], [start], [table], block_size)
            assert metadata.positions.tolist() == list(range(start, end))
            write_kv_cache(k[start:end], v[start:end], caches["k"], caches["v"], metadata.slot_mapping)
            rows.append(attention(q[start:end], caches["k"], caches["v"], metadata, HEAD_DIM**-0.5))
        torch.testing.assert_close(torch.cat(rows), expected)


def test_slot_mapping_follows_the_block_table():
    metadata = build_attention_metadata([3, 1], [2, 4], [[7, 2], [5, 9]], block_size=3)
    # seq 0: positions 2, 3, 4 -> block 7 offset 2, block 2 offsets 0 and 1
    # seq 1: position 4 -> block 9 offset 1
    assert metadata.slot_mapping.tolist() == [7 * 3 + 2, 2 * 3 + 0, 2 * 3 + 1, 9 * 3 + 1]
    assert metadata.positions.tolist() == [2, 3, 4, 4]
    assert metadata.query_start_loc.tolist() == [0, 3, 4]
    assert metadata.seq_lens.tolist() == [5, 5]


@pytest.mark.parametrize("head_major", [True, False])
def test_native_kv_write_matches_index_copy_on_strided_rows(head_major):
    """K and V as the model hands them over (strided slices of one qkv row) land in the same
    slots, bit for bit, as with torch's index_copy_; other slots stay untouched. In the engine's
    layout (head-major within a block) and in plain token-major rows."""
    if cpu_extension.load() is None:
        pytest.skip("no C compiler here")
    generator = torch.Generator().manual_seed(5)
    num_kv_heads, tokens = 3, 37
    qkv = torch.randn(tokens, 4 + 2 * num_kv_heads, HEAD_DIM, generator=generator)
    k, v = qkv[:, 4 : 4 + num_kv_heads], qkv[:, 4 + num_kv_heads :]
    slots = torch.randperm(64 * 16, generator=generator)[:tokens]
    shape = (64, 16, num_kv_heads, HEAD_DIM)
    native = {
        name: (kv_cache_tensor(*shape, torch.float32) if head_major else torch.empty(shape)).fill_(7.0)
        for name in ("k", "v")
    }
    assert native["k"].is_contiguous() is not head_major
    expected = {name: cache.contiguous() for name, cache in native.items()}
    assert all(cpu_extension.supports_f32_write(x, native[name]) for name, x in (("k", k), ("v", v)))
    write_kv_cache(k, v, native["k"], native["v"], slots)
    for name, rows in (("k", k), ("v", v)):
        expected[name].view(-1, num_kv_heads, HEAD_DIM).index_copy_(0, slots, rows)
        assert torch.equal(native[name], expected[name])
