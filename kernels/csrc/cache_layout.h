/* A paged KV cache's layout as kernels/cpu_extension.py passes it (`cache_layout`): an int64[4] of
 * the block size, then the element strides of a block, a token and a KV head (head_dim is
 * contiguous). Any layout works; the engine's is head-major within a block. */
#pragma once
#include <stdint.h>

enum { LAYOUT_BLOCK_SIZE, LAYOUT_BLOCK, LAYOUT_TOKEN, LAYOUT_HEAD };

/* Offset of slot `slot`'s values of KV head 0. */
static inline int64_t slot_offset(int64_t slot, const int64_t *layout) {
    const int64_t block_size = layout[LAYOUT_BLOCK_SIZE];
    return (slot / block_size) * layout[LAYOUT_BLOCK] + (slot % block_size) * layout[LAYOUT_TOKEN];
}
