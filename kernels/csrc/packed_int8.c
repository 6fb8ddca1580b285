/* int8 linear layers: float32 rows quantized per token, times int8 weights packed in panels of 16
 * outputs, accumulated exactly in int32: `vpdpbusd` with AVX-512 VNNI, `vpmaddwd` with AVX2.
 *
 * A weight's activations take one of two forms (int8_quantize.c's, per row t of x):
 * - W8A8: unit = max(max|x[t]|, FLT_MIN) / 127, q = round_half_even(x[t] / unit) in [-127, 127];
 *   y[t, o] = (float)(q . w[o]) * (scales[o] * unit[t]);
 * - exact (weight-only int8): unit = max(...) / 63, scaled = x[t] / unit, hi = round_half_even(scaled)
 *   and lo = round_half_even((scaled - hi) * 126), both in [-63, 63], so x = unit * (hi + lo / 126);
 *   y[t, o] = ((float)(hi . w[o]) + (float)(lo . w[o]) * (1 / 126)) * (scales[o] * unit[t]), the
 *   first sum fused.
 * A bias is added last, fused. Neither instruction rounds or saturates an intermediate sum (AVX2's
 * `vpmaddubsw` would: fbgemm's trap), so the integer products are exact for k <= MAX_K (checked),
 * and both builds compute the float epilogue op for op: the same bits on every CPU. The Python
 * path and the decode stack both call this kernel, so they agree bit for bit.
 *
 * Weight buffer (kernels/quant/panel_int8.py packs it), n16 = n rounded up to 16, g = k / 4
 * rounded up: a 64-byte header (int32 parts: 1 W8A8, 2 exact), float scales[n16], int32
 * sums[n16] (128 * sum(w[o]), for VNNI's unsigned activations), then int8 panels [n16 / 16][g][16
 * outputs][4 inputs]; padding zero. A register tile holds MR rows of one part each: MR tokens'
 * q, or MR / 2 tokens' hi then the same tokens' lo.
 * Each thread takes a contiguous range of panels; a panel is read once per block of MC rows. A
 * block's first tile over a panel asks for the next panel the thread reads (into L2): the next
 * of its range, else its first for the next block, else (where the caller, the decode stack,
 * names the linear it runs next) its first panel there (w8a8 + kv int8 engine on our Xeon,
 * paired per step: 1.02-1.06x). A row's result never depends on its batch. Returns 0, -1 where
 * this build has neither AVX-512 VNNI nor AVX2, -2 out of memory, k too large or an unknown header.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"

#define NR 16  /* outputs per panel */
#define HEADER_BYTES 64
/* How a tile holds a token's activations: its q (W8A8, header parts 1); its hi and lo parts in two
 * rows (exact, parts 2); or, with AVX2 and k <= MAX_K_FOLDED, 126 * hi + lo in one int16 row
 * (exact too, one pass: `vpmaddwd` gains nothing from 7-bit parts, VNNI's bytes cannot hold it). */
enum { Q = 1, SPLIT = 2, FOLDED = 3 };
/* Tile row i (of a tile of `rows` tokens) holds a token's q, hi part or folded row where i < rows,
 * its lo part (SPLIT) where i - MR / 2 < rows. */
#define ACTIVE(i) (form != SPLIT ? (i) < rows : (i) % (MR / 2) < rows)
#define MAX_K (INT32_MAX / (255 * 127) / 4 * 4)
#define PREFETCH_BYTES 1024

/* The int8 panels of a weight buffer with `panels` panels. */
static const int8_t *panels_of(const void *weight, int64_t panels) {
    return (const int8_t *)weight + HEADER_BYTES + panels * NR * (sizeof(float) + sizeof(int32_t));
}

/* As int8_gemm_packed_then splits the panels. */
Lines int8_first_panel(const NextPanels *next, int64_t t, int num_threads) {
    const int64_t panels = next ? (next->n + NR - 1) / NR : 0, groups = next ? (next->k + 3) / 4 : 0;
    const int64_t threads = num_threads < panels ? num_threads : panels;
    if (!next || !next->weights || t >= threads) return (Lines){NULL, 0};
    return (Lines){panels_of(next->weights, panels) + panels * t / threads * groups * NR * 4, groups * NR * 4};
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

/* AVX-512 VNNI: `vpdpbusd` multiplies unsigned by signed bytes, so activations go in as q + 128
 * (bytes, groups of 4 per tile row) and each output subtracts 128 * sum(w[o]); a tile is 16 rows x
 * one panel, a zmm accumulator per row. */
#define INSTRUCTION "vpdpbusd"
typedef uint8_t act_t;
#define ACT_ZERO 128 /* the byte of activation 0 */
#define MR 16        /* activation rows per register tile */
#define MC 256       /* tokens per block: their quantized rows stay in L2 while every panel passes */
#define VEC 16       /* floats per vector when quantizing */
typedef __m512 vec;
#define vec_load _mm512_loadu_ps
#define vec_set1 _mm512_set1_ps
#define vec_div _mm512_div_ps
#define vec_sub _mm512_sub_ps
#define vec_mul _mm512_mul_ps
#define vec_fmadd _mm512_fmadd_ps
#define vec_round(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

static int activation_form(int parts, int64_t k) {
    (void)k;
    return parts;
}

/* 16 scaled values x / unit (or their parts) as bytes v + 128 into 4 groups of a tile row. */
static inline void store_groups(__m512 values, act_t *out) {
    const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(values), _mm512_set1_epi32(128)); /* half even */
    uint32_t bytes[4];
    _mm_storeu_si128((__m128i *)bytes, _mm512_cvtepi32_epi8(q));
    for (int j = 0; j < 4; j++) memcpy(out + j * MR * 4, bytes + j, 4);
}

#define ACC(i) __m512i c##i = _mm512_setzero_si512();
#define DOT(i) \
    if (ACTIVE(i)) c##i = _mm512_dpbusd_epi32(c##i, _mm512_set1_epi32(((const int32_t *)x)[g * MR + i]), w);
#define PRODUCT(i) _mm512_cvtepi32_ps(_mm512_sub_epi32(c##i, sums))
#define STORE_Q(i) \
    if (i < rows) store_row(PRODUCT(i), scales, unit[i], bias, y + i * ldy, mask);
/* token i's hi part in tile row i, its lo part in tile row lo = i + 8 */
#define STORE_SPLIT(i, lo) \
    if (i < rows) store_row(_mm512_fmadd_ps(PRODUCT(lo), lo_weight, PRODUCT(i)), scales, unit[i], bias, \
                            y + i * ldy, mask);
#define HALF_ROWS(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7)
#define ALL_ROWS(op) HALF_ROWS(op) op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15)
#define SPLIT_PAIRS(op) op(0, 8) op(1, 9) op(2, 10) op(3, 11) op(4, 12) op(5, 13) op(6, 14) op(7, 15)

static inline void store_row(__m512 product, __m512 scales, float unit, const float *bias, float *row,
                             __mmask16 mask) {
    const __m512 scale = _mm512_mul_ps(scales, _mm512_set1_ps(unit));
    _mm512_mask_storeu_ps(row, mask, bias ? _mm512_fmadd_ps(product, scale, _mm512_maskz_loadu_ps(mask, bias))
                                          : _mm512_mul_ps(product, scale));
}

/* One tile: `rows` tokens (a compile-time constant at every call, as is `form`) x 16 outputs. */
static inline __attribute__((always_inline)) void tile(const int rows, const int form, const act_t *x,
                                                       const int8_t *panel, int64_t groups,
                                                       const int32_t *panel_sums, const float *panel_scales,
                                                       const float *unit, const float *bias, float *y,
                                                       int64_t ldy, int64_t cols, const int8_t *next_panel) {
    ALL_ROWS(ACC)
#pragma GCC unroll 4
    for (int64_t g = 0; g < groups; g++) {
        const __m512i w = _mm512_loadu_si512(panel + g * NR * 4);
        _mm_prefetch((const char *)(panel + g * NR * 4 + PREFETCH_BYTES), _MM_HINT_T0);
        if (next_panel) _mm_prefetch((const char *)(next_panel + g * NR * 4), _MM_HINT_T1);
        ALL_ROWS(DOT)
    }
    const __mmask16 mask = cols >= NR ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
    const __m512i sums = _mm512_loadu_si512(panel_sums);
    const __m512 scales = _mm512_loadu_ps(panel_scales);
    if (form == Q) {
        ALL_ROWS(STORE_Q)
    } else {
        const __m512 lo_weight = _mm512_set1_ps(1.0f / 126.0f);
        SPLIT_PAIRS(STORE_SPLIT)
    }
}

#define Q_CASE(i) \
    case i + 1: tile(i + 1, Q, x, panel, groups, sums, scales, unit, bias, y, ldy, cols, next_panel); break;
#define SPLIT_CASE(i) \
    case i + 1: tile(i + 1, SPLIT, x, panel, groups, sums, scales, unit, bias, y, ldy, cols, next_panel); break;

static void tile_rows(int rows, int form, const act_t *x, const int8_t *panel, int64_t groups,
                      const int32_t *sums, const float *scales, const float *unit, const float *bias, float *y,
                      int64_t ldy, int64_t cols, const int8_t *next_panel) {
    if (form == Q) switch (rows) { ALL_ROWS(Q_CASE) }
    else switch (rows) { HALF_ROWS(SPLIT_CASE) }
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* AVX2: `vpmaddwd` multiplies int16 pairs and adds each pair in int32 (no saturation, unlike
 * `vpmaddubsw`'s int16 sums), so activations go in as signed int16 (groups of 4 per tile row) and
 * the weights are sign-extended as they are loaded; the sums go unused. A tile is 4 rows x half a
 * panel (8 outputs): a group's 32 weight bytes widen to two ymm of 4 outputs x 4 inputs, and a
 * row's 4 activations are broadcast to both; each of the 8 int32 accumulators holds 4 outputs x
 * 2 partial sums, added pairwise at the end. 6 rows (12 accumulators) measured ~1.4x slower
 * (AVX2 build on our Zen 4). */
#define INSTRUCTION "vpmaddwd"
typedef int16_t act_t;
#define ACT_ZERO 0
#define MR 4
#define MC 240 /* a multiple of MR and MR / 2 */
#define VEC 8
typedef __m256 vec;
#define vec_load _mm256_loadu_ps
#define vec_set1 _mm256_set1_ps
#define vec_div _mm256_div_ps
#define vec_sub _mm256_sub_ps
#define vec_mul _mm256_mul_ps
#define vec_fmadd _mm256_fmadd_ps
#define vec_round(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* |126 hi + lo| <= 8001 and |w| <= 128: k products' int32 sum stays exact up to here (4 | k). */
#define MAX_K_FOLDED (INT32_MAX / (8001 * 128) / 4 * 4)

static int activation_form(int parts, int64_t k) { return parts == SPLIT && k <= MAX_K_FOLDED ? FOLDED : parts; }

/* 8 scaled values x / unit (or their parts) as int16 into 2 groups of a tile row. */
static inline void store_groups(__m256 values, act_t *out) {
    const __m256i q = _mm256_cvtps_epi32(values); /* half even */
    const __m256i halves = _mm256_packs_epi32(q, q); /* |q| <= 8001: no saturation */
    _mm_storel_epi64((__m128i *)out, _mm256_castsi256_si128(halves));
    _mm_storel_epi64((__m128i *)(out + MR * 4), _mm256_extracti128_si256(halves, 1));
}

#define ACC(i) __m256i c##i##0 = _mm256_setzero_si256(), c##i##1 = _mm256_setzero_si256();
#define DOT(i)                                                                           \
    if (ACTIVE(i)) {                                                                     \
        int64_t four;                                                                    \
        memcpy(&four, x + (g * MR + i) * 4, sizeof four);                                \
        const __m256i a = _mm256_set1_epi64x(four);                                      \
        c##i##0 = _mm256_add_epi32(c##i##0, _mm256_madd_epi16(a, w0));                   \
        c##i##1 = _mm256_add_epi32(c##i##1, _mm256_madd_epi16(a, w1));                   \
    }
/* The 8 outputs' int32 products in order: hadd gives outputs 0 1 4 5 | 2 3 6 7. */
#define PRODUCT(i) \
    _mm256_cvtepi32_ps(_mm256_permute4x64_epi64(_mm256_hadd_epi32(c##i##0, c##i##1), _MM_SHUFFLE(3, 1, 2, 0)))
#define STORE_Q(i) \
    if (i < rows) store_row(PRODUCT(i), scales, unit[i], bias, y + i * ldy, cols);
#define STORE_SPLIT(i, lo) \
    if (i < rows) store_row(_mm256_fmadd_ps(PRODUCT(lo), lo_weight, PRODUCT(i)), scales, unit[i], bias, \
                            y + i * ldy, cols);
#define HALF_ROWS(op) op(0) op(1)
#define ALL_ROWS(op) HALF_ROWS(op) op(2) op(3)
#define SPLIT_PAIRS(op) op(0, 2) op(1, 3)
#define HALF 8 /* outputs per tile */

/* As the VNNI epilogue, op for op (same bits); `cols` of the 8 outputs are stored. */
static inline void store_row(__m256 product, __m256 scales, float unit, const float *bias, float *row,
                             int64_t cols) {
    const __m256 scale = _mm256_mul_ps(scales, _mm256_set1_ps(unit));
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(cols < HALF ? cols : HALF)), lanes);
    _mm256_maskstore_ps(row, mask, bias ? _mm256_fmadd_ps(product, scale, _mm256_maskload_ps(bias, mask))
                                        : _mm256_mul_ps(product, scale));
}

/* One tile: `rows` tokens (compile-time constants, as is `form`) x the 8 outputs of half a panel,
 * `panel` at the half's first byte of group 0. */
static inline __attribute__((always_inline)) void tile(const int rows, const int form, const act_t *x,
                                                       const int8_t *panel, int64_t groups,
                                                       const float *half_scales, const float *unit,
                                                       const float *bias, float *y, int64_t ldy, int64_t cols,
                                                       const int8_t *next_panel) {
    ALL_ROWS(ACC)
#pragma GCC unroll 2
    for (int64_t g = 0; g < groups; g++) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(panel + g * NR * 4)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(panel + g * NR * 4 + 16)));
        _mm_prefetch((const char *)(panel + g * NR * 4 + PREFETCH_BYTES), _MM_HINT_T0);
        if (next_panel) _mm_prefetch((const char *)(next_panel + g * NR * 4), _MM_HINT_T1);
        ALL_ROWS(DOT)
    }
    const __m256 scales = _mm256_loadu_ps(half_scales);
    if (form != SPLIT) { /* FOLDED's unit is 1/126 of its parts' */
        ALL_ROWS(STORE_Q)
    } else {
        const __m256 lo_weight = _mm256_set1_ps(1.0f / 126.0f);
        SPLIT_PAIRS(STORE_SPLIT)
    }
}

#define HALF_TILE(r, form, h)                                                                         \
    tile(r, form, x, panel + h * HALF * 4, groups, scales + h * HALF, unit, bias ? bias + h * HALF : NULL, \
         y + h * HALF, ldy, cols - h * HALF, h ? NULL : next_panel);
#define BOTH_HALVES(r, form)                       \
    case r:                                        \
        HALF_TILE(r, form, 0)                      \
        if (cols > HALF) HALF_TILE(r, form, 1)   \
        break;
#define Q_CASE(i) BOTH_HALVES(i + 1, Q)
#define SPLIT_CASE(i) BOTH_HALVES(i + 1, SPLIT)

static void tile_rows(int rows, int form, const act_t *x, const int8_t *panel, int64_t groups,
                      const int32_t *sums, const float *scales, const float *unit, const float *bias, float *y,
                      int64_t ldy, int64_t cols, const int8_t *next_panel) {
    (void)sums;
    if (form != SPLIT) switch (rows) { ALL_ROWS(Q_CASE) } /* a FOLDED tile is a Q tile */
    else switch (rows) { HALF_ROWS(SPLIT_CASE) }
}
#endif

#ifdef MR
/* Token i's row into a tile: `hi` (its q, its hi part, or 126 * hi + lo) at tile row `r`, its lo
 * part (SPLIT) MR / 2 rows further; activation 0 past k. FOLDED's unit: the parts' unit / 126. */
static void quantize_row(const float *row, int64_t k, int64_t groups, int form, act_t *hi, float *unit) {
    act_t *lo = hi + MR / 2 * 4;
    const float u = int8_row_unit(row, k, form == Q ? 127.0f : 63.0f);
    *unit = form == FOLDED ? u / 126.0f : u;
    const vec divisor = vec_set1(u), lo_scale = vec_set1(126.0f);
    int64_t g = 0;
    for (; 4 * g + VEC <= k; g += VEC / 4) {
        const vec scaled = vec_div(vec_load(row + 4 * g), divisor);
        if (form == Q) {
            store_groups(scaled, hi + g * MR * 4);
            continue;
        }
        const vec h = vec_round(scaled), l = vec_mul(vec_sub(scaled, h), lo_scale);
        if (form == FOLDED) {
            store_groups(vec_fmadd(h, lo_scale, vec_round(l)), hi + g * MR * 4);
            continue;
        }
        store_groups(h, hi + g * MR * 4);
        store_groups(l, lo + g * MR * 4);
    }
    for (; g < groups; g++)
        for (int e = 0; e < 4; e++) {
            const float scaled = 4 * g + e < k ? row[4 * g + e] / u : 0.0f, h = nearbyintf(scaled);
            const float l = nearbyintf((scaled - h) * 126.0f);
            hi[g * MR * 4 + e] = (act_t)((form == FOLDED ? 126.0f * h + l : h) + ACT_ZERO);
            if (form == SPLIT) lo[g * MR * 4 + e] = (act_t)(l + ACT_ZERO);
        }
}

/* Tile rows a token takes. */
static int rows_per_token(int form) { return form == SPLIT ? 2 : 1; }

/* Every token's rows into tiles of MR rows interleaved by groups of 4 inputs; tile rows past m are
 * activation 0. A tile holds per_tile = MR / rows_per_token tokens. */
static void quantize_tiles(const float *x, int64_t m, int64_t k, int64_t ldx, int64_t groups, int form,
                           act_t *tiles, float *unit) {
    const int parts = rows_per_token(form);
    const int64_t per_tile = MR / parts;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < (m + per_tile - 1) / per_tile * per_tile; i++) {
        act_t *tile = tiles + i / per_tile * groups * MR * 4, *hi = tile + i % per_tile * 4;
        if (i < m) {
            quantize_row(x + i * ldx, k, groups, form, hi, unit + i);
            continue;
        }
        for (int part = 0; part < parts; part++)
            for (int64_t g = 0; g < groups; g++)
                for (int e = 0; e < 4; e++) hi[part * MR / 2 * 4 + g * MR * 4 + e] = ACT_ZERO;
    }
}

int int8_gemm_packed_then(const float *x, int64_t m, int64_t k, int64_t ldx, const void *weight, int64_t n,
                          const float *bias, float *y, int64_t ldy, int num_threads, const NextPanels *next) {
    const int parts = *(const int32_t *)weight;
    if (k > MAX_K || (parts != Q && parts != SPLIT)) return -2;
    const int form = activation_form(parts, k);
    const int64_t groups = (k + 3) / 4, panels = (n + NR - 1) / NR, per_tile = MR / rows_per_token(form);
    const float *scales = (const float *)((const char *)weight + HEADER_BYTES);
    const int32_t *sums = (const int32_t *)(scales + panels * NR);
    const int8_t *packed = panels_of(weight, panels);
    const int requested = num_threads; /* as the next call is asked, before it is cut to its panels */
    act_t *tiles = malloc((m + per_tile - 1) / per_tile * groups * MR * 4 * sizeof(act_t));
    float *unit = malloc(sizeof(float) * (m > 0 ? m : 1));
    if (!tiles || !unit) {
        free(tiles), free(unit);
        return -2;
    }
    if (num_threads > panels) num_threads = (int)panels;
    if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
    {
        quantize_tiles(x, m, k, ldx, groups, form, tiles, unit); /* ends with a barrier */
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t begin = panels * t / threads, end = panels * (t + 1) / threads;
        const int8_t *then_panel = int8_first_panel(next, t, requested).start;
        for (int64_t m0 = 0; m0 < m; m0 += MC)
            for (int64_t p = begin; p < end; p++) {
                const int64_t cols = n - p * NR < NR ? n - p * NR : NR, m_end = m - m0 < MC ? m : m0 + MC;
                for (int64_t i = m0; i < m_end; i += per_tile)
                    tile_rows(m_end - i < per_tile ? (int)(m_end - i) : (int)per_tile, form,
                              tiles + i / per_tile * groups * MR * 4, packed + p * groups * NR * 4, groups,
                              sums + p * NR, scales + p * NR, unit + i, bias ? bias + p * NR : NULL,
                              y + i * ldy + p * NR, ldy, cols,
                              i > m0 ? NULL : p + 1 < end ? packed + (p + 1) * groups * NR * 4 /* its next panel */
                                        : m_end < m ? packed + begin * groups * NR * 4 : then_panel);
            }
    }
    free(tiles), free(unit);
    return 0;
}

const char *int8_panel_instruction(void) { return INSTRUCTION; }
#else
const char *int8_panel_instruction(void) { return NULL; }

int int8_gemm_packed_then(const float *x, int64_t m, int64_t k, int64_t ldx, const void *weight, int64_t n,
                          const float *bias, float *y, int64_t ldy, int num_threads, const NextPanels *next) {
    return -1;
}
#endif

int int8_gemm_packed(const float *x, int64_t m, int64_t k, int64_t ldx, const void *weight, int64_t n,
                     const float *bias, float *y, int64_t ldy, int num_threads) {
    return int8_gemm_packed_then(x, m, k, ldx, weight, n, bias, y, ldy, num_threads, NULL);
}
