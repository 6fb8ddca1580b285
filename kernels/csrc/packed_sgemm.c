/* float32 linear layers over weights packed in panels of 16 outputs: y[m, n] = x[m, :] . w[n, :] + bias[n].
 *
 * Panel p holds w[16p + j][kk] at packed[(p * k + kk) * 16 + j], rows past n zero (packed in torch:
 * kernels/packed_float.py). A register tile of MR rows x 16 outputs (16 rows of one zmm each
 * with AVX-512, 6 rows of two ymm halves with AVX2) reads a panel as one sequential stream,
 * prefetched ahead; a block's first tile also asks for the lines of the next panel the thread
 * reads (into L2), so with several tiles per panel the next one is in L2 when its first tile
 * starts (weights cold, our Zen 4: 1.35x at 8 rows, 1.05-1.1x at 32-128): the next of its range,
 * else the first of its range for the next block of rows or k-slice (fp32 engine on our Xeon,
 * paired per step: 1.03x), else the first it reads in the linear that the caller runs next.
 * Each thread takes a contiguous range of panels.
 * Up to MC rows (a decode step): every weight is read once per call. More rows (prefill): blocked
 * along k and m, so a panel's k-slice is reused from L1/L2 across a block of rows, and the rows'
 * k-slice stays in L2 across the panels. Each thread first copies a block's rows into tiles of MR
 * interleaved by k, so a step's broadcasts read consecutive floats instead of rows far apart
 * (same run on our Zen 2 EPYC: 1.05x at 96 rows, 1.1x at 2048, par at 1-32).
 * A caller that knows that linear (the decode stack) passes its weights, so a layer's GEMMs
 * stream on without a cold start (fp32 engine on our Xeon, paired per step: 1.03-1.04x).
 * The accumulation order of a row depends only on k: a row's result never depends on its batch. */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"

#define NR 16  /* outputs per panel: one 16-float (AVX-512) or two 8-float (AVX2) vectors */
#define KC 576  /* widest k-slice (k = 1536 goes in 3 slices of 512); wider measured no better */
#define MC 128  /* rows per block kept in L2 (x's k-slice: 288 KiB), so a decode step is one block */
#define PREFETCH_FLOATS 512 /* the weight stream, 2 KiB ahead */

/* The first of thread t's contiguous share of the panels. */
static int64_t range_start(int64_t panels, int64_t t, int64_t threads) { return panels * t / threads; }

/* Threads for `panels` panels: at most one per panel, at least one. */
static int team_size(int num_threads, int64_t panels) {
    const int64_t threads = num_threads < panels ? num_threads : panels;
    return threads < 1 ? 1 : (int)threads;
}

Lines sgemm_first_panel(const NextPanels *next, int64_t t, int num_threads) {
    const int64_t panels = next ? (next->n + NR - 1) / NR : 0, threads = team_size(num_threads, panels);
    if (!next || !next->weights || t >= threads || panels == 0) return (Lines){NULL, 0};
    const float *packed = next->weights;
    return (Lines){packed + range_start(panels, t, threads) * next->k * NR, next->k * NR * (int64_t)sizeof(float)};
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#if defined(__AVX512F__)
/* AVX-512: 16 rows x 16 outputs, one zmm accumulator per row (one weight load and 16 broadcasts
 * per k step). Half the instructions of two ymm halves per FMA, which pays even where a zmm FMA
 * runs as two 256-bit halves (our Zen 4, cold weights, same run: 1.15-1.3x over the AVX2 tile
 * at 8-32 rows, 1.0-1.1x at 96-2048). */
#define MR 16
#define ACC(i) __m512 c##i = _mm512_setzero_ps();
#define FMA(i) \
    if (rows > i) c##i = _mm512_fmadd_ps(_mm512_set1_ps(x[kk * MR + i]), w, c##i);
#define STORE(i) \
    if (rows > i) store_row(c##i, y + i * ldy, bias, first, cols);
#define LOAD_WEIGHTS const __m512 w = _mm512_loadu_ps(panel + kk * NR)
#define ALL_ROWS(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) \
    op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15)

static inline void store_row(__m512 acc, float *row, const float *bias, int first, int64_t cols) {
    const __mmask16 mask = cols >= NR ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
    if (!first) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, row));
    else if (bias) acc = _mm512_add_ps(acc, _mm512_loadu_ps(bias));
    _mm512_mask_storeu_ps(row, mask, acc);
}
#else
/* AVX2: 6 rows x 16 outputs, two ymm accumulators per row (two weight loads, 6 broadcasts). */
#define MR 6
#define ACC(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
#define FMA(i)                                                                              \
    if (rows > i) {                                                                         \
        const __m256 a = _mm256_broadcast_ss(x + kk * MR + i);                              \
        c##i##0 = _mm256_fmadd_ps(a, w0, c##i##0);                                          \
        c##i##1 = _mm256_fmadd_ps(a, w1, c##i##1);                                          \
    }
#define STORE(i) \
    if (rows > i) store_row(c##i##0, c##i##1, y + i * ldy, bias, first, cols);
#define LOAD_WEIGHTS \
    const __m256 w0 = _mm256_loadu_ps(panel + kk * NR), w1 = _mm256_loadu_ps(panel + kk * NR + 8)
#define ALL_ROWS(op) op(0) op(1) op(2) op(3) op(4) op(5)

static inline void store_row(__m256 lo, __m256 hi, float *row, const float *bias, int first, int64_t cols) {
    float out[NR];
    float *dst = cols == NR ? row : out;
    if (cols < NR) memcpy(out, row, cols * sizeof(float));
    if (!first) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(dst));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(dst + 8));
    } else if (bias) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
    }
    _mm256_storeu_ps(dst, lo);
    _mm256_storeu_ps(dst + 8, hi);
    if (cols < NR) memcpy(row, out, cols * sizeof(float));
}
#endif

/* One tile: rows x 16 outputs over a k-slice of `depth`, x a tile of `pack_rows`; `first` starts
 * from the bias (or zero), otherwise adds to y. `rows` is a compile-time constant at every call
 * (see tile_rows), so the accumulators live in registers. Either width sums each output over k
 * in the same order, so AVX-512 and AVX2 builds give the same bits. */
static inline __attribute__((always_inline)) void tile(
    const int rows, const float *x, const float *panel, int64_t depth, const float *bias,
    int first, float *y, int64_t ldy, int64_t cols, const float *next_panel) {
    ALL_ROWS(ACC)
#pragma GCC unroll 4
    for (int64_t kk = 0; kk < depth; kk++) {
        LOAD_WEIGHTS;
        _mm_prefetch((const char *)(panel + kk * NR + PREFETCH_FLOATS), _MM_HINT_T0);
        if (next_panel) _mm_prefetch((const char *)(next_panel + kk * NR), _MM_HINT_T1);
        ALL_ROWS(FMA)
    }
    ALL_ROWS(STORE)
}

#define TILE_CASE(i) \
    case i + 1: tile(i + 1, x, panel, depth, bias, first, y, ldy, cols, next_panel); break;

static void tile_rows(
    int rows, const float *x, const float *panel, int64_t depth, const float *bias, int first, float *y,
    int64_t ldy, int64_t cols, const float *next_panel) {
    switch (rows) { ALL_ROWS(TILE_CASE) }
}

/* A block of `rows` rows as ceil(rows / MR) tiles of near-equal size: tile i's first row (and
 * the next tile's, so its count). Even tiles keep every tile's FMA chains busy: a 113-row block
 * as 7 x 16 + 1 runs its last tile at the FMA latency, not the throughput. */
static int64_t tiles_in(int64_t rows) { return (rows + MR - 1) / MR; }
static int64_t tile_start(int64_t rows, int64_t i) {
    const int64_t tiles = tiles_in(rows);
    return i * (rows / tiles) + (i < rows % tiles ? i : rows % tiles);
}

/* Rows [m0, m_end) of x over the k-slice [k0, k0 + depth) as those tiles, each MR rows wide
 * interleaved by k: tiles[(t * depth + kk) * MR + r] = x[m0 + tile_start(t) + r][k0 + kk]. */
static void pack_rows(
    const float *x, int64_t ldx, int64_t m0, int64_t m_end, int64_t k0, int64_t depth, float *tiles) {
    const int64_t rows = m_end - m0;
    for (int64_t t = 0; t < tiles_in(rows); t++) {
        float *tile = tiles + t * MR * depth;
        const int64_t first = tile_start(rows, t), count = tile_start(rows, t + 1) - first;
        for (int64_t kk = 0; kk < depth; kk++)
            for (int r = 0; r < MR; r++) tile[kk * MR + r] = r < count ? x[(m0 + first + r) * ldx + k0 + kk] : 0.0f;
    }
}

/* Rows per block: as few blocks of at most MC rows as cover m, of near-equal size (m = 200 is two
 * blocks of 100, not 128 + 72: each block re-reads every panel the thread has). MC 128 and even
 * blocks and tiles against MC 96 (a 100-row decode step was 96 + 4, its weights read twice),
 * fp32 engine on our Xeon, paired per step: 1.037-1.039x, then 1.012-1.020x. */
static int64_t block_rows(int64_t m) {
    const int64_t blocks = (m + MC - 1) / MC; /* m >= 1: sgemm_packed_then returns before */
    return (m + blocks - 1) / blocks;
}

/* bias: n floats padded to whole panels (or NULL); tiles: room for `tile_floats(m, k)`. */
static void panels_range(
    const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n, const float *bias,
    float *y, int64_t ldy, int64_t panel_begin, int64_t panel_end, float *tiles, const float *then_panel) {
    const int64_t k_blocks = (k + KC - 1) / KC, kc = (k + k_blocks - 1) / k_blocks;  /* even slices */
    const int64_t mc = block_rows(m);
    for (int64_t k0 = 0; k0 < k; k0 += kc) {
        const int64_t depth = k - k0 < kc ? k - k0 : kc;
        for (int64_t m0 = 0; m0 < m; m0 += mc) {
            const int64_t m_end = m - m0 < mc ? m : m0 + mc;
            pack_rows(x, ldx, m0, m_end, k0, depth, tiles);
            for (int64_t p = panel_begin; p < panel_end; p++) {
                const float *panel = packed + (p * k + k0) * NR;
                const int64_t cols = n - p * NR < NR ? n - p * NR : NR;
                const float *panel_bias = bias ? bias + p * NR : NULL;
                const float *next_panel = p + 1 < panel_end ? panel + k * NR /* this thread's next panel: */
                                          : m_end < m ? packed + (panel_begin * k + k0) * NR /* next rows */
                                          : k0 + depth < k ? packed + (panel_begin * k + k0 + depth) * NR
                                          : then_panel;
                for (int64_t t = 0; t < tiles_in(m_end - m0); t++) {
                    const int64_t first = tile_start(m_end - m0, t);
                    const int rows = (int)(tile_start(m_end - m0, t + 1) - first);
                    tile_rows(rows, tiles + t * MR * depth, panel, depth, panel_bias, k0 == 0,
                              y + (m0 + first) * ldy + p * NR, ldy, cols, t == 0 ? next_panel : NULL);
                }
            }
        }
    }
}

/* Floats of one thread's packed rows: a block of rows rounded up to whole tiles, times a k-slice. */
static int64_t tile_floats(int64_t m, int64_t k) {
    return tiles_in(block_rows(m)) * MR * (k < KC ? k : KC);
}

/* 0, -1 where this build has no AVX2/FMA (the caller keeps oneDNN), -2 out of memory. */
int sgemm_packed_then(
    const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n, const float *bias,
    float *y, int64_t ldy, int num_threads, const NextPanels *next) {
    const int64_t panels = (n + NR - 1) / NR;
    int failed = 0;
    if (m == 0) return 0; /* no rows (e.g. no logits wanted this step): nothing to split */
#pragma omp parallel num_threads(team_size(num_threads, panels))
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        const float *then_panel = sgemm_first_panel(next, t, num_threads).start;
        float *tiles = malloc(sizeof(float) * tile_floats(m, k));
        if (tiles)
            panels_range(x, m, k, ldx, packed, n, bias, y, ldy, range_start(panels, t, threads),
                         range_start(panels, t + 1, threads), tiles, then_panel);
        else failed = 1;
        free(tiles);
    }
    return failed ? -2 : 0;
}
#else
int sgemm_packed_then(
    const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n, const float *bias,
    float *y, int64_t ldy, int num_threads, const NextPanels *next) {
    return -1;
}
#endif

int sgemm_packed(
    const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n, const float *bias,
    float *y, int64_t ldy, int num_threads) {
    return sgemm_packed_then(x, m, k, ldx, packed, n, bias, y, ldy, num_threads, NULL);
}
