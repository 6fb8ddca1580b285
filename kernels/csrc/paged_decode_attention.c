/* Paged decode attention on CPU: one query token per sequence, float32 or int8 KV cache.
 *
 * Reads each sequence's keys and values straight from their cache blocks (no gather copy, no
 * padding to the longest sequence). Sequences run in parallel (OpenMP); per KV head, a pass
 * over the sequence's K slots scores the query heads that share it, a softmax per head
 * (vectorized exp, normalized once at the end), then one pass over its V slots.
 * With AVX2 and head_dim % 32 == 0, each K or V value loaded is used at once by up to three query
 * heads of the group, in register tiles of 4 tokens x 3 heads for the scores and 3 heads x 32
 * dims (64 with AVX-512) for the values (12 independent accumulators). Other shapes with
 * head_dim % 8 == 0 compute scores 8 tokens at a time (one transpose-reduce instead of 8
 * horizontal sums) and accumulate V in registers over tiles of tokens.
 *
 * An int8 cache stores one float32 scale per (slot, KV head): value = scale * int8, so its
 * traffic is a quarter of float32's and the kernel is bound by instructions, not memory. Its K
 * values meet the query heads in integers (scores_int16: q rounded to 16 bits, int32 sums), its V
 * values are widened to floats in the value tiles; the scales multiply the scores and the
 * probabilities instead of every value. A KV head's scales are first gathered into two rows
 * (one load per token, where the tiles did a dependent lookup per token and head): K's scale a
 * tile of scores at once, V's the probabilities as they are exponentiated. Other int8 shapes
 * widen tiles of tokens into a small float buffer that the heads share.
 *
 * q:                 [num_seqs, num_heads, head_dim] float32, sequences q_stride floats apart (a
 *                    sequence's heads contiguous: q may be a slice of the fused projection's rows)
 * out:               [num_seqs, num_heads, head_dim] float32
 * k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_dim] float32 or int8, laid out
 *                    by `layout` (cache_layout.h). The engine stores a block head-major ([num_blocks,
 *                    num_kv_heads, block_size, head_dim]), so one KV head's rows of a block are
 *                    one contiguous run: 1.6x faster on a float32 cache than token-major rows, of
 *                    which each KV head's pass reads a third, on our Zen 2.
 * k_scales, v_scales [num_blocks, block_size, num_kv_heads] float32, contiguous (int8 caches only)
 * block_tables:      [num_seqs, max_blocks] (int64), seq_lens: [num_seqs] (int64)
 * then:              [num_threads] lines that each thread asks for (into L2) when it runs out of
 *                    sequences, before it waits for the others (the decode stack: its first panel
 *                    of the o projection), or NULL
 * Other arrays are contiguous. Returns 0, or < 0 for unsupported shapes / out of memory.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include "cache_layout.h"
#include "kernels.h"
#include "vector_exp.h"

#define V_TILE 32
#define HEADS 3  /* query heads per register tile of the int8 path */
#define K_TILE 4 /* tokens per register tile of the int8 scores */
#define PREFETCH 32 /* tokens ahead: cache blocks are scattered, so the hardware cannot guess them */
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    const float *q;          /* the first query head of this KV head's group */
    const void *k_cache;     /* float or int8 values */
    const void *v_cache;
    const float *k_scales;   /* int8 caches: k_scales[t], token t's scale in this KV head; NULL otherwise */
    const float *v_scales;
    const int64_t *rows;     /* rows[t]: offset of token t's values of KV head 0 */
    int64_t len, group, kv_head, head_dim, head_stride;
    float scale;
    /* What this thread reads next, so the end of each pass prefetches the start of the next:
     * V after K, then the next KV head's K, then the next sequence's first KV head's K. */
    int64_t next_kv_head;    /* -1 after the last KV head */
    const int64_t *next_rows; /* after the last KV head: the next sequence's rows (or NULL) */
    int64_t next_len;
} Item;

INLINE int64_t value_offset(const Item *s, int64_t t) { return s->rows[t] + s->kv_head * s->head_stride; }
INLINE float scale_at(const float *scales, int64_t t) { return scales ? scales[t] : 1.0f; }
INLINE float load1(const void *cache, int is_int8, int64_t i) {
    return is_int8 ? (float)((const int8_t *)cache)[i] : ((const float *)cache)[i];
}

/* Walks the block table once, so the passes over K and V do no division per token. */
static void slots_of(const int64_t *table, int64_t len, const int64_t *layout, int64_t *slots, int64_t *rows) {
    const int64_t block_size = layout[LAYOUT_BLOCK_SIZE];
    for (int64_t t = 0, b = 0; t < len; b++)
        for (int64_t o = 0; o < block_size && t < len; o++, t++) {
            slots[t] = table[b] * block_size + o;
            rows[t] = table[b] * layout[LAYOUT_BLOCK] + o * layout[LAYOUT_TOKEN];
        }
}

/* scores[i * len + t] = scale * q_i . k_t for the group's heads i, t in [from, len): portable. */
INLINE void scores_scalar(const Item *s, int is_int8, float *scores, int64_t from) {
    for (int64_t t = from; t < s->len; t++) {
        const int64_t k = value_offset(s, t);
        const float k_scale = scale_at(s->k_scales, t) * s->scale;
        for (int64_t i = 0; i < s->group; i++) {
            const float *qi = s->q + i * s->head_dim;
            float sum = 0.0f;
            for (int64_t d = 0; d < s->head_dim; d++) sum += qi[d] * load1(s->k_cache, is_int8, k + d);
            scores[i * s->len + t] = sum * k_scale;
        }
    }
}

/* acc[i] += sum_t p_i[t] * v_t, for t in [0, len): portable (int8: p carries V's scales). */
INLINE void values_scalar(const Item *s, int is_int8, const float *probs, float *acc) {
    for (int64_t t = 0; t < s->len; t++) {
        const int64_t v = value_offset(s, t);
        for (int64_t i = 0; i < s->group; i++) {
            const float p = probs[i * s->len + t];
            float *a = acc + i * s->head_dim;
            for (int64_t d = 0; d < s->head_dim; d++) a[d] += p * load1(s->v_cache, is_int8, v + d);
        }
    }
}

#ifdef __AVX2__
/* r[j] = horizontal sum of a[j], j = 0..7 */
INLINE __m256 reduce8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

INLINE __m256 widen8(const int8_t *values) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)values)));
}

/* 8 values of the cache from index i on, as floats (int8 values widened, not scaled). */
INLINE __m256 load8(const void *cache, int is_int8, int64_t i) {
    return is_int8 ? widen8((const int8_t *)cache + i) : _mm256_loadu_ps((const float *)cache + i);
}

/* Asks for the cache lines of token t + PREFETCH's row of this KV head (past the pass's end, the
 * matching row at the start of the thread's next pass): cache blocks are scattered, so no
 * hardware prefetcher can guess them. Into L2 (T1), not L1: L1's few miss buffers capped a
 * core's stream (Zen 4, float32 cache: 16.5 -> 23-25 GB/s over two cores). */
INLINE void prefetch_row(const Item *s, const void *cache, int is_int8, int64_t t) {
    const int64_t *rows = s->rows;
    int64_t ahead = t + PREFETCH, head = s->kv_head, len = s->len;
    if (ahead >= len) { /* past this pass's end: the start of the next pass */
        ahead -= len;
        if (cache == s->k_cache) cache = s->v_cache;
        else if (s->next_kv_head >= 0) cache = s->k_cache, head = s->next_kv_head;
        else if (s->next_rows) cache = s->k_cache, head = 0, rows = s->next_rows, len = s->next_len;
        else return;
        if (ahead >= len) return;
    }
    const int64_t size = is_int8 ? 1 : sizeof(float);
    const char *row = (const char *)cache + (rows[ahead] + head * s->head_stride) * size;
    for (int64_t b = 0; b < s->head_dim * size; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
}

/* Points rows[j] at the float values of tokens [t, t + n) of this KV head. A float cache is
 * read in place; int8 values are widened and scaled once into `buffer` ([n, head_dim]), so the
 * group's query heads all reuse them. */
INLINE void tile_rows(const Item *s, const void *cache, const float *scales, int is_int8, int64_t t, int64_t n,
                      float *buffer, const float **rows) {
    for (int64_t j = 0; j < n; j++) {
        const int64_t offset = value_offset(s, t + j);
        prefetch_row(s, cache, is_int8, t + j);
        if (!is_int8) {
            rows[j] = (const float *)cache + offset;
            continue;
        }
        const int8_t *values = (const int8_t *)cache + offset;
        const __m256 scale = _mm256_set1_ps(scale_at(scales, t + j));
        float *row = buffer + j * s->head_dim;
        for (int64_t d = 0; d < s->head_dim; d += 8) _mm256_storeu_ps(row + d, _mm256_mul_ps(widen8(values + d), scale));
        rows[j] = row;
    }
}

/* The 4 horizontal sums of a0..a3. */
INLINE __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* Query head h0 + g of a tile of the group's heads [h0, h0 + HEADS); past the group's end, head h0
 * again (its results are computed and dropped, so the tiles' loops have constant bounds). */
INLINE int64_t tile_head(const Item *s, int64_t h0, int g) { return h0 + g < s->group ? h0 + g : h0; }

INLINE void head_rows(const Item *s, const float *base, int64_t stride, int64_t h0, const float **rows) {
    for (int g = 0; g < HEADS; g++) rows[g] = base + tile_head(s, h0, g) * stride;
}

/* Scores of every query head, K_TILE tokens x HEADS heads per register tile: each K load
 * serves the group's heads at once. */
INLINE void scores_tiled(const Item *s, int is_int8, float *scores) {
    const void *cache = s->k_cache;
    const int64_t tiled = s->len - s->len % K_TILE;
    const __m128 scale = _mm_set1_ps(s->scale);
    for (int64_t h0 = 0; h0 < s->group; h0 += HEADS) {
        const float *q[HEADS];
        head_rows(s, s->q, s->head_dim, h0, q);
        for (int64_t t = 0; t < tiled; t += K_TILE) {
            int64_t k[K_TILE];
            for (int j = 0; j < K_TILE; j++) {
                k[j] = value_offset(s, t + j);
                prefetch_row(s, cache, is_int8, t + j);
            }
            __m256 acc[K_TILE][HEADS];
            for (int j = 0; j < K_TILE; j++)
                for (int g = 0; g < HEADS; g++) acc[j][g] = _mm256_setzero_ps();
            for (int64_t d = 0; d < s->head_dim; d += 8)
                for (int j = 0; j < K_TILE; j++) {
                    const __m256 kv = load8(cache, is_int8, k[j] + d);
                    for (int g = 0; g < HEADS; g++) acc[j][g] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q[g] + d), acc[j][g]);
                }
            const __m128 tile_scales = s->k_scales ? _mm_mul_ps(_mm_loadu_ps(s->k_scales + t), scale) : scale;
            for (int g = 0; g < HEADS && h0 + g < s->group; g++) {
                const __m128 sums = reduce4(acc[0][g], acc[1][g], acc[2][g], acc[3][g]);
                _mm_storeu_ps(scores + (h0 + g) * s->len + t, _mm_mul_ps(sums, tile_scales));
            }
        }
    }
    scores_scalar(s, is_int8, scores, tiled);
}

/* Scores over an int8 K in integers: each query head rounded to 16 bits (unit = max |q| / 32767,
 * an error 1/256 of K's own rounding), the dot products exact in int32 lanes (64 dims x 32767 x 127
 * < 2^28; head_dim <= 256 keeps them < 2^31), one conversion per score instead of one per K value:
 * AVX-512 VNNI multiplies and adds 32 int16 pairs per instruction, AVX2 16 (vpmaddwd + vpaddd). */
#define Q_MAX 32767
#define INT_HEAD_DIM_MAX 256
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QDIMS 32 /* int16 query values per step */
typedef __m512i IVec;
INLINE IVec ivec_zero(void) { return _mm512_setzero_si512(); }
INLINE IVec widen_k(const int8_t *k) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)k)); }
INLINE IVec dot_add(IVec acc, IVec k, const int16_t *q) { return _mm512_dpwssd_epi32(acc, k, _mm512_loadu_si512(q)); }
INLINE __m256i fold(IVec a) { return _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1)); }
#else
#define QDIMS 16
typedef __m256i IVec;
INLINE IVec ivec_zero(void) { return _mm256_setzero_si256(); }
INLINE IVec widen_k(const int8_t *k) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)k)); }
INLINE IVec dot_add(IVec acc, IVec k, const int16_t *q) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(k, _mm256_loadu_si256((const __m256i *)q)));
}
INLINE __m256i fold(IVec a) { return a; }
#endif

/* The 4 horizontal sums of a0..a3 (int32 lanes), as floats. */
INLINE __m128 reduce4_epi32(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
    const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    return _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)));
}

/* q16 [group, head_dim] = the group's query heads rounded to 16 bits; units[i] their steps.
 * Returns 0 when a query value is not finite (the float path then carries its NaN through). */
INLINE int round_queries(const Item *s, int16_t *q16, float *units) {
    for (int64_t i = 0; i < s->group; i++) {
        const float *qi = s->q + i * s->head_dim;
        float max = 0.0f;
        int finite = 1;
        for (int64_t d = 0; d < s->head_dim; d++) {
            finite &= fabsf(qi[d]) <= FLT_MAX;
            max = fabsf(qi[d]) > max ? fabsf(qi[d]) : max;
        }
        if (!finite) return 0;
        units[i] = max > 0.0f ? max / Q_MAX : 1.0f;
        const float inverse = 1.0f / units[i];
        for (int64_t d = 0; d < s->head_dim; d++) q16[i * s->head_dim + d] = (int16_t)lrintf(qi[d] * inverse);
    }
    return 1;
}

/* The int8 cache's scores, K_TILE tokens x HEADS heads per register tile as in scores_tiled;
 * returns 0, having written nothing, where round_queries does. */
INLINE int scores_int16(const Item *s, float *scores) {
    const int8_t *cache = s->k_cache;
    int16_t q16[s->group * s->head_dim];
    float units[s->group];
    if (!round_queries(s, q16, units)) return 0;
    const int64_t tiled = s->len - s->len % K_TILE;
    const __m128 scale = _mm_set1_ps(s->scale);
    for (int64_t h0 = 0; h0 < s->group; h0 += HEADS) {
        const int16_t *q[HEADS];
        for (int g = 0; g < HEADS; g++) q[g] = q16 + tile_head(s, h0, g) * s->head_dim;
        for (int64_t t = 0; t < tiled; t += K_TILE) {
            int64_t k[K_TILE];
            for (int j = 0; j < K_TILE; j++) {
                k[j] = value_offset(s, t + j);
                prefetch_row(s, cache, 1, t + j);
            }
            IVec acc[K_TILE][HEADS];
            for (int j = 0; j < K_TILE; j++)
                for (int g = 0; g < HEADS; g++) acc[j][g] = ivec_zero();
            for (int64_t d = 0; d < s->head_dim; d += QDIMS)
                for (int j = 0; j < K_TILE; j++) {
                    const IVec kv = widen_k(cache + k[j] + d);
                    for (int g = 0; g < HEADS; g++) acc[j][g] = dot_add(acc[j][g], kv, q[g] + d);
                }
            const __m128 tile_scales = _mm_mul_ps(_mm_loadu_ps(s->k_scales + t), scale);
            for (int g = 0; g < HEADS && h0 + g < s->group; g++) {
                const __m128 sums = reduce4_epi32(fold(acc[0][g]), fold(acc[1][g]), fold(acc[2][g]), fold(acc[3][g]));
                const __m128 units_scales = _mm_mul_ps(tile_scales, _mm_set1_ps(units[h0 + g]));
                _mm_storeu_ps(scores + (h0 + g) * s->len + t, _mm_mul_ps(sums, units_scales));
            }
        }
    }
    scores_scalar(s, 1, scores, tiled);
    return 1;
}

/* The widest float vector of this build for the value pass: AVX-512 holds a 64-dim head's tile
 * in registers, so V is read in one sweep (two with AVX2; 1.2x faster on our Zen 4). */
#ifdef __AVX512F__
typedef __m512 Vec;
#define LANES 16
INLINE Vec vec_zero(void) { return _mm512_setzero_ps(); }
INLINE Vec vec_set1(float x) { return _mm512_set1_ps(x); }
INLINE Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
INLINE void vec_accumulate(float *out, Vec a) { _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), a)); }
INLINE Vec vec_load(const void *cache, int is_int8, int64_t i) {
    if (!is_int8) return _mm512_loadu_ps((const float *)cache + i);
    const __m128i values = _mm_loadu_si128((const __m128i *)((const int8_t *)cache + i));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(values));
}
#else
typedef __m256 Vec;
#define LANES 8
INLINE Vec vec_zero(void) { return _mm256_setzero_ps(); }
INLINE Vec vec_set1(float x) { return _mm256_set1_ps(x); }
INLINE Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
INLINE void vec_accumulate(float *out, Vec a) { _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), a)); }
INLINE Vec vec_load(const void *cache, int is_int8, int64_t i) { return load8(cache, is_int8, i); }
#endif
#define V_CHUNK (4 * LANES) /* dimensions per register tile of the value pass */

/* acc[i] += sum_t p_i[t] * v_t in register tiles of HEADS heads x V_CHUNK dimensions: each V load
 * serves the group's heads, and 12 independent accumulators keep the FMA units busy. */
INLINE void values_tiled(const Item *s, int is_int8, const float *probs, float *acc) {
    const void *cache = s->v_cache;
    for (int64_t h0 = 0; h0 < s->group; h0 += HEADS) {
        const float *p[HEADS];
        head_rows(s, probs, s->len, h0, p);
        for (int64_t d0 = 0; d0 < s->head_dim; d0 += V_CHUNK) {
            Vec a[HEADS][4];
            for (int g = 0; g < HEADS; g++)
                for (int c = 0; c < 4; c++) a[g][c] = vec_zero();
            for (int64_t t = 0; t < s->len; t++) {
                const int64_t v = value_offset(s, t) + d0;
                if (d0 == 0) prefetch_row(s, cache, is_int8, t);
                Vec w[HEADS];
                for (int g = 0; g < HEADS; g++) w[g] = vec_set1(p[g][t]);
                for (int c = 0; c < 4; c++) {
                    const Vec vv = vec_load(cache, is_int8, v + LANES * c);
                    for (int g = 0; g < HEADS; g++) a[g][c] = vec_fmadd(w[g], vv, a[g][c]);
                }
            }
            for (int g = 0; g < HEADS && h0 + g < s->group; g++) {
                float *out = acc + (h0 + g) * s->head_dim + d0;
                for (int c = 0; c < 4; c++) vec_accumulate(out + LANES * c, a[g][c]);
            }
        }
    }
}

INLINE void scores_avx2(const Item *s, int is_int8, float *scores, float *buffer) {
    const __m256 scale = _mm256_set1_ps(s->scale);
    int64_t t = 0;
    for (; t + 8 <= s->len; t += 8) {
        const float *k[8];
        tile_rows(s, s->k_cache, s->k_scales, is_int8, t, 8, buffer, k);
        for (int64_t i = 0; i < s->group; i++) {
            const float *qi = s->q + i * s->head_dim;
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < s->head_dim; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qi + d);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + d), acc[j]);
            }
            _mm256_storeu_ps(scores + i * s->len + t, _mm256_mul_ps(reduce8(acc), scale));
        }
    }
    scores_scalar(s, is_int8, scores, t);
}

INLINE void values_avx2(const Item *s, int is_int8, const float *probs, float *acc, float *buffer) {
    for (int64_t t0 = 0; t0 < s->len; t0 += V_TILE) {
        const int64_t n = s->len - t0 < V_TILE ? s->len - t0 : V_TILE;
        const float *v[V_TILE];
        tile_rows(s, s->v_cache, NULL, is_int8, t0, n, buffer, v); /* V's scales are in the probabilities */
        for (int64_t i = 0; i < s->group; i++) {
            const float *p = probs + i * s->len + t0;
            float *a = acc + i * s->head_dim;
            int64_t d = 0;
            for (; d + 32 <= s->head_dim; d += 32) { /* 4 registers of the output stay put */
                __m256 a0 = _mm256_loadu_ps(a + d), a1 = _mm256_loadu_ps(a + d + 8);
                __m256 a2 = _mm256_loadu_ps(a + d + 16), a3 = _mm256_loadu_ps(a + d + 24);
                for (int64_t j = 0; j < n; j++) {
                    const __m256 w = _mm256_set1_ps(p[j]);
                    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v[j] + d), a0);
                    a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v[j] + d + 8), a1);
                    a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v[j] + d + 16), a2);
                    a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v[j] + d + 24), a3);
                }
                _mm256_storeu_ps(a + d, a0), _mm256_storeu_ps(a + d + 8, a1);
                _mm256_storeu_ps(a + d + 16, a2), _mm256_storeu_ps(a + d + 24, a3);
            }
            for (; d < s->head_dim; d += 8) {
                __m256 a0 = _mm256_loadu_ps(a + d);
                for (int64_t j = 0; j < n; j++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v[j] + d), a0);
                _mm256_storeu_ps(a + d, a0);
            }
        }
    }
}
#endif

/* Turns a row of scores into unnormalized probabilities e^(score - max), each times its token's V
 * scale where the cache is int8; returns the sum of the unscaled ones. */
INLINE float exponentiate(float *row, int64_t len, const float *v_scales) {
    float max = -INFINITY, sum = 0.0f;
    int64_t t = 0;
#ifdef __AVX2__
    __m256 maxima = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= len; t += 8) maxima = _mm256_max_ps(maxima, _mm256_loadu_ps(row + t));
    float lanes[8];
    _mm256_storeu_ps(lanes, maxima);
    for (int j = 0; j < 8; j++) max = lanes[j] > max ? lanes[j] : max;
#endif
    for (; t < len; t++) max = row[t] > max ? row[t] : max;
    t = 0;
#ifdef __AVX2__
    const __m256 shift = _mm256_set1_ps(max);
    __m256 total = _mm256_setzero_ps();
    for (; t + 8 <= len; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t), shift));
        total = _mm256_add_ps(total, e);
        _mm256_storeu_ps(row + t, v_scales ? _mm256_mul_ps(e, _mm256_loadu_ps(v_scales + t)) : e);
    }
    _mm256_storeu_ps(lanes, total);
    for (int j = 0; j < 8; j++) sum += lanes[j];
#endif
    for (; t < len; t++) {
        const float e = expf(row[t] - max);
        sum += e;
        row[t] = e * scale_at(v_scales, t);
    }
    return sum;
}

/* out rows of the group = softmax(scores) V; scores [group, len], acc [group, head_dim] zeroed,
 * buffer [V_TILE, head_dim] for widened int8 K values. */
INLINE void attend(const Item *s, int is_int8, float *scores, float *acc, float *buffer, float *out) {
#ifdef __AVX2__
    const int tiled = s->head_dim % 32 == 0;
    const int vectorized = s->head_dim % 8 == 0 && !tiled;
    const int in_integers = is_int8 && tiled && s->head_dim <= INT_HEAD_DIM_MAX && scores_int16(s, scores);
    if (tiled && !in_integers) scores_tiled(s, is_int8, scores);
    if (vectorized) scores_avx2(s, is_int8, scores, buffer);
#else
    const int tiled = 0, vectorized = 0;
#endif
    if (!vectorized && !tiled) scores_scalar(s, is_int8, scores, 0);
    float inverse_sums[s->group];
    for (int64_t i = 0; i < s->group; i++)
        inverse_sums[i] = 1.0f / exponentiate(scores + i * s->len, s->len, s->v_scales);
#ifdef __AVX2__
    const int chunked = s->head_dim % V_CHUNK == 0;
    if (tiled && chunked) values_tiled(s, is_int8, scores, acc);
    if (vectorized || (tiled && !chunked)) values_avx2(s, is_int8, scores, acc, buffer);
#endif
    if (!vectorized && !tiled) values_scalar(s, is_int8, scores, acc);
    for (int64_t i = 0; i < s->group; i++)
        for (int64_t d = 0; d < s->head_dim; d++) out[i * s->head_dim + d] = acc[i * s->head_dim + d] * inverse_sums[i];
}

/* A thread out of sequences asks for what it reads next (into L2) before it waits for the others. */
static void ask_for(Lines lines) {
    for (int64_t b = 0; lines.start && b < lines.bytes; b += 64) __builtin_prefetch((const char *)lines.start + b, 0, 2);
}

typedef void (*Attend)(const Item *s, float *scores, float *acc, float *buffer, float *out);

/* A copy of `attend` per kind of cache and common head size: with is_int8 and head_dim known at
 * compile time the tiles' loops unroll and keep no branch. (OpenMP outlines decode's loop body
 * before inlining, so a flag handed to decode stays a runtime test inside every tile.) */
#define ATTEND(name, int8, dim)                                                               \
    static void name(const Item *s, float *scores, float *acc, float *buffer, float *out) { \
        Item c = *s;                                                                          \
        if (dim) c.head_dim = dim;                                                            \
        attend(&c, int8, scores, acc, buffer, out);                                           \
    }
ATTEND(attend_f32, 0, 0)
ATTEND(attend_i8, 1, 0)
ATTEND(attend_i8_64, 1, 64)
ATTEND(attend_i8_128, 1, 128)

static Attend attend_for(int is_int8, int64_t head_dim) {
    if (!is_int8) return attend_f32;
    return head_dim == 64 ? attend_i8_64 : head_dim == 128 ? attend_i8_128 : attend_i8;
}

INLINE int decode(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, const float *k_scales,
                  const float *v_scales, const int64_t *block_tables, const int64_t *seq_lens, float *out,
                  int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                  const int64_t *layout, int64_t max_blocks, float scale, int num_threads, int is_int8,
                  const Lines *then) {
    const int64_t group = num_heads / num_kv_heads;
    if (group * num_kv_heads != num_heads) return -1;
    const Attend attend_one = attend_for(is_int8, head_dim);
    int64_t max_len = 1;
    for (int64_t i = 0; i < num_seqs; i++) max_len = seq_lens[i] > max_len ? seq_lens[i] : max_len;
    int failed = 0;
    int64_t next = 0; /* sequences are taken one at a time, in order, by whichever thread is free */
#pragma omp parallel num_threads(num_threads)
    {
        int64_t *slots = malloc(sizeof(int64_t) * 4 * max_len); /* this sequence's, then the next one's */
        float *scores = malloc(sizeof(float) * group * max_len);
        float *head_scales = is_int8 ? malloc(sizeof(float) * 2 * max_len) : NULL; /* K's row, V's row */
        float *acc = malloc(sizeof(float) * group * head_dim);
        float *buffer = malloc(sizeof(float) * V_TILE * head_dim);
        const int ready = slots && scores && (!is_int8 || head_scales) && acc && buffer;
        if (!ready) failed = 1;
        int64_t *current = slots, *following = slots + 2 * max_len;
        int64_t i = ready ? __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED) : num_seqs;
        if (i < num_seqs) slots_of(block_tables + i * max_blocks, seq_lens[i], layout, current, current + max_len);
        while (i < num_seqs) {
            const int64_t j = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (j < num_seqs) slots_of(block_tables + j * max_blocks, seq_lens[j], layout, following, following + max_len);
            for (int64_t h = 0; h < num_kv_heads; h++) {
                for (int64_t e = 0; e < group * head_dim; e++) acc[e] = 0.0f;
                for (int64_t t = 0; is_int8 && t < seq_lens[i]; t++) {
                    head_scales[t] = k_scales[current[t] * num_kv_heads + h];
                    head_scales[max_len + t] = v_scales[current[t] * num_kv_heads + h];
                }
                const int64_t first = (i * num_heads + h * group) * head_dim;
                const int last_head = h + 1 == num_kv_heads;
                const Item s = {q + i * q_stride + h * group * head_dim, k_cache, v_cache, head_scales,
                                is_int8 ? head_scales + max_len : NULL, current + max_len, seq_lens[i], group, h,
                                head_dim, layout[LAYOUT_HEAD], scale, last_head ? -1 : h + 1,
                                last_head && j < num_seqs ? following + max_len : NULL, j < num_seqs ? seq_lens[j] : 0};
                attend_one(&s, scores, acc, buffer, out + first);
            }
            int64_t *done = current;
            current = following, following = done, i = j;
        }
        if (then) ask_for(then[omp_get_thread_num()]);
        free(buffer);
        free(slots);
        free(scores);
        free(head_scales);
        free(acc);
    }
    return failed ? -2 : 0;
}

int paged_decode_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                               const int64_t *block_tables, const int64_t *seq_lens, float *out,
                               int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, const int64_t *layout, int64_t max_blocks, float scale,
                               int num_threads, const Lines *then) {
    return decode(q, q_stride, k_cache, v_cache, NULL, NULL, block_tables, seq_lens, out, num_seqs, num_heads,
                  num_kv_heads, head_dim, layout, max_blocks, scale, num_threads, 0, then);
}

int paged_decode_attention_i8(const float *q, int64_t q_stride, const int8_t *k_cache, const int8_t *v_cache,
                              const float *k_scales, const float *v_scales, const int64_t *block_tables,
                              const int64_t *seq_lens, float *out, int64_t num_seqs, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_dim, const int64_t *layout, int64_t max_blocks,
                              float scale, int num_threads, const Lines *then) {
    return decode(q, q_stride, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens, out, num_seqs, num_heads,
                  num_kv_heads, head_dim, layout, max_blocks, scale, num_threads, 1, then);
}
