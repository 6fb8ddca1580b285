/* Row-wise float32 ops of a decoder layer, one pass per row where torch needs several ops.
 *
 * rms_norm_f32:     out[r] = (x[r] * rsqrt(mean(x[r]^2) + eps)) * weight
 * add_rms_norm_f32: x[r] += delta[r] (the residual stream, in place), then out[r] as above
 * silu_mul_f32:     out[r, c] = silu(gate_up[r, c]) * gate_up[r, n + c] for c < n, where
 *                   silu(g) = g / (1 + e^-g) (the gate and up projections side by side)
 * rotary_f32:       out[t, h] = x[t, h] * cos[p] + swap_halves(x[t, h]) * signed_sin[p], p = positions[t]
 *                   (rotate-half RoPE over every head of a token; out is [tokens, heads, dim])
 * argmax_f32:       out[r] = x[r].argmax(): the first of equal maxima, the first NaN if any (torch's
 *                   answer), one vectorized pass over blocks (greedy sampling's rows of logits)
 *
 * The products are rounded as torch rounds them; only the order of the sum of squares (and
 * e^x, ~1 ulp) differ. Rows are split among OpenMP threads when there are enough of them.
 * x, delta, out: [rows, cols] with row strides given; weight: [cols]; all float32.
 */
#include <math.h>
#include <stdint.h>
#include "kernels.h"
#include "vector_exp.h"

#define ROWS_PER_THREAD 16 /* fewer rows run on the calling thread alone */

static float sum_of_squares(const float *x, int64_t cols) {
    float sum = 0.0f;
    int64_t c = 0;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; c + 16 <= cols; c += 16) {
        const __m256 v0 = _mm256_loadu_ps(x + c), v1 = _mm256_loadu_ps(x + c + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0), a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(a0, a1));
    for (int j = 0; j < 8; j++) sum += lanes[j];
#endif
    for (; c < cols; c++) sum += x[c] * x[c];
    return sum;
}

static void normalize_row(const float *x, const float *weight, int64_t cols, float eps, float *out) {
    const float rstd = 1.0f / sqrtf(sum_of_squares(x, cols) / (float)cols + eps);
    int64_t c = 0;
#ifdef __AVX2__
    const __m256 r = _mm256_set1_ps(rstd);
    for (; c + 8 <= cols; c += 8)
        _mm256_storeu_ps(out + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + c), r), _mm256_loadu_ps(weight + c)));
#endif
    for (; c < cols; c++) out[c] = (x[c] * rstd) * weight[c];
}

static void add_row(float *x, const float *delta, int64_t cols) {
    int64_t c = 0;
#ifdef __AVX2__
    for (; c + 8 <= cols; c += 8) _mm256_storeu_ps(x + c, _mm256_add_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(delta + c)));
#endif
    for (; c < cols; c++) x[c] += delta[c];
}

void rms_norm_f32(const float *x, int64_t x_stride, const float *weight, int64_t rows, int64_t cols, float eps,
                  float *out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= 2 * ROWS_PER_THREAD)
    for (int64_t r = 0; r < rows; r++) normalize_row(x + r * x_stride, weight, cols, eps, out + r * cols);
}

void add_rms_norm_f32(float *x, int64_t x_stride, const float *delta, int64_t delta_stride, const float *weight,
                      int64_t rows, int64_t cols, float eps, float *out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= 2 * ROWS_PER_THREAD)
    for (int64_t r = 0; r < rows; r++) {
        add_row(x + r * x_stride, delta + r * delta_stride, cols);
        normalize_row(x + r * x_stride, weight, cols, eps, out + r * cols);
    }
}

void silu_mul_f32(const float *gate_up, int64_t rows, int64_t n, float *out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= 2 * ROWS_PER_THREAD)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * n, *up = gate + n;
        float *o = out + r * n;
        int64_t c = 0;
#ifdef __AVX2__
        const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
        for (; c + 8 <= n; c += 8) {
            const __m256 g = _mm256_loadu_ps(gate + c);
            const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
            _mm256_storeu_ps(o + c, _mm256_mul_ps(silu, _mm256_loadu_ps(up + c)));
        }
#endif
        for (; c < n; c++) o[c] = gate[c] / (1.0f + expf(-gate[c])) * up[c];
    }
}

/* Two products and their sum, each rounded (never fused into an FMA): the torch path's bits.
 * Returns -1 (and writes nothing) where a position is outside the tables' `table_rows`. */
__attribute__((optimize("fp-contract=off"))) int rotary_f32(
    const float *x, int64_t token_stride, int64_t head_stride, const int64_t *positions, const float *cos,
    const float *signed_sin, int64_t table_rows, int64_t tokens, int64_t heads, int64_t dim, float *out,
    int num_threads) {
    for (int64_t t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= table_rows) return -1;
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(num_threads) if (tokens >= 2 * ROWS_PER_THREAD)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + positions[t] * dim, *s = signed_sin + positions[t] * dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *v = x + t * token_stride + h * head_stride;
            float *o = out + (t * heads + h) * dim;
            for (int64_t d = 0; d < half; d++) o[d] = v[d] * c[d] + v[d + half] * s[d];
            for (int64_t d = half; d < dim; d++) o[d] = v[d] * c[d] + v[d - half] * s[d];
        }
    }
    return 0;
}

#define ARGMAX_BLOCK 64
#define ARGMAX_VALUES_PER_THREAD 16384 /* fewer values run on the calling thread alone */

/* The maximum of x[b, end) by x[c] > m ? x[c] : m (maxps's rule: a NaN never wins), and
 * whether a NaN is among them. */
static float block_max(const float *x, int64_t b, int64_t end, int *nan) {
    float m = -INFINITY;
    int64_t c = b;
#ifdef __AVX2__
    if (end - b == ARGMAX_BLOCK) {
        __m256 acc = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
        for (; c < end; c += 8) {
            const __m256 v = _mm256_loadu_ps(x + c);
            acc = _mm256_max_ps(v, acc);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
        *nan = _mm256_movemask_ps(unordered) != 0;
        return m;
    }
#endif
    *nan = 0;
    for (; c < end; c++) {
        m = x[c] > m ? x[c] : m;
        *nan |= x[c] != x[c];
    }
    return m;
}

static int64_t argmax_row(const float *x, int64_t cols) {
    float best = -INFINITY;
    int64_t best_block = 0;
    for (int64_t b = 0; b < cols; b += ARGMAX_BLOCK) {
        const int64_t end = cols - b < ARGMAX_BLOCK ? cols : b + ARGMAX_BLOCK;
        int nan;
        const float m = block_max(x, b, end, &nan);
        if (nan)
            for (int64_t c = b; c < end; c++)
                if (x[c] != x[c]) return c;
        if (m > best) best = m, best_block = b;  /* strictly: the first block holding the maximum */
    }
    for (int64_t c = best_block; c < cols; c++)
        if (x[c] == best) return c;
    return 0;  /* every value -inf: the first */
}

void argmax_f32(const float *x, int64_t x_stride, int64_t rows, int64_t cols, int64_t *out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= 2 && rows * cols >= 2 * ARGMAX_VALUES_PER_THREAD)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * x_stride, cols);
}
