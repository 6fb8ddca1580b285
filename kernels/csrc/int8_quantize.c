/* int8 quantization on the hot path, one pass where torch needs five ops.
 *
 * quantize_rows_int8: activations per token, for fbgemm's W8A8 linear (kernels/quant/int8.py).
 * For each row t of x [rows, cols] (row stride x_stride): unit[t] = max(max|x[t]|, FLT_MIN) / 127
 * and out[t, c] = round_half_even(x[t, c] / unit[t]), integers in [-127, 127] stored as float.
 * out has rows + 1 rows: the last is the anchor row (-128 in column 0, 127 in the last column,
 * zeros elsewhere) that pins fbgemm's dynamic range to scale 1, zero point 128.
 *
 * split_rows_int7: activations per token for fbgemm's weight-only int8 linear with (almost) exact
 * activations: unit[t] = max(max|x[t]|, FLT_MIN) / 63, scaled = x[t] / unit[t],
 * hi = round_half_even(scaled) and lo = round_half_even((scaled - hi) * 126), so that
 * x = unit * (hi + lo / 126). out has 2 * rows + 1 rows: hi of every row, lo of every row,
 * then the anchor row (-64 in column 0, 63 in the last column) for fbgemm's 7-bit range.
 *
 * quantize_rows_s8 and split_rows_s7: the same integers written as int8 with no anchor row, for
 * oneDNN's int8 GEMM (kernels/quant/onednn_int8.py), which takes signed 8-bit activations as they are.
 *
 * write_kv_int8: new K or V [tokens, heads, head_dim] (token rows x_stride floats apart, a token's
 * heads contiguous) into an int8 paged cache (kernels/quant/kv_cache.py): per (token, head)
 * scale = max|x| / 127, values round_half_even(x * (1 / scale)) clamped to [-127, 127] (0 for an
 * all-zero row), stored at data[slot / block_size, slot % block_size, head, :] (laid out by
 * `layout`, cache_layout.h) and scales[slot, head] (contiguous).
 */
#include <float.h>
#include <math.h>
#include "cache_layout.h"
#include "kernels.h"
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static float row_max_abs(const float *x, int64_t cols) {
    float max = 0.0f;
    int64_t c = 0;
#ifdef __AVX2__
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (; c + 8 <= cols; c += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + c)));
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    for (int j = 0; j < 8; j++) max = lanes[j] > max ? lanes[j] : max;
#endif
    for (; c < cols; c++) max = fabsf(x[c]) > max ? fabsf(x[c]) : max;
    return max;
}

static void divide_and_round(const float *x, int64_t cols, float unit, float *out) {
    int64_t c = 0;
#ifdef __AVX2__
    const __m256 u = _mm256_set1_ps(unit);
    for (; c + 8 <= cols; c += 8)
        _mm256_storeu_ps(out + c, _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + c), u),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; c < cols; c++) out[c] = nearbyintf(x[c] / unit);
}

/* A row's unit: max|x| / top, never 0. */
float int8_row_unit(const float *x, int64_t cols, float top) {
    const float max = row_max_abs(x, cols);
    return (max > FLT_MIN ? max : FLT_MIN) / top;
}

/* The row spanning [-(top + 1), top] that pins fbgemm's dynamic range to scale 1. */
static void write_anchor(float *row, int64_t cols, float top) {
    for (int64_t c = 0; c < cols; c++) row[c] = 0.0f;
    row[0] = -(top + 1.0f);
    row[cols - 1] = top;
}

void quantize_rows_int8(const float *x, int64_t rows, int64_t cols, int64_t x_stride, float *out, float *unit,
                        int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * cols >= (1 << 16))
    for (int64_t t = 0; t < rows; t++) {
        unit[t] = int8_row_unit(x + t * x_stride, cols, 127.0f);
        divide_and_round(x + t * x_stride, cols, unit[t], out + t * cols);
    }
    write_anchor(out + rows * cols, cols, 127.0f);
}

static void split_row(const float *x, int64_t cols, float unit, float *hi, float *lo) {
    int64_t c = 0;
#ifdef __AVX2__
    const __m256 u = _mm256_set1_ps(unit), lo_scale = _mm256_set1_ps(126.0f);
    for (; c + 8 <= cols; c += 8) {
        const __m256 scaled = _mm256_div_ps(_mm256_loadu_ps(x + c), u);
        const __m256 h = _mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(hi + c, h);
        _mm256_storeu_ps(lo + c, _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(scaled, h), lo_scale),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    for (; c < cols; c++) {
        const float scaled = x[c] / unit;
        hi[c] = nearbyintf(scaled);
        lo[c] = nearbyintf((scaled - hi[c]) * 126.0f);
    }
}

void split_rows_int7(const float *x, int64_t rows, int64_t cols, int64_t x_stride, float *out, float *unit,
                     int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * cols >= (1 << 16))
    for (int64_t t = 0; t < rows; t++) {
        unit[t] = int8_row_unit(x + t * x_stride, cols, 63.0f);
        split_row(x + t * x_stride, cols, unit[t], out + t * cols, out + (rows + t) * cols);
    }
    write_anchor(out + 2 * rows * cols, cols, 63.0f);
}

void quantize_rows_s8(const float *x, int64_t rows, int64_t cols, int64_t x_stride, int8_t *out, float *unit,
                      int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * cols >= (1 << 16))
    for (int64_t t = 0; t < rows; t++) {
        const float *row = x + t * x_stride;
        const float u = unit[t] = int8_row_unit(row, cols, 127.0f);
        int8_t *q = out + t * cols;
        for (int64_t c = 0; c < cols; c++) q[c] = (int8_t)nearbyintf(row[c] / u);
    }
}

void split_rows_s7(const float *x, int64_t rows, int64_t cols, int64_t x_stride, int8_t *out, float *unit,
                   int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * cols >= (1 << 16))
    for (int64_t t = 0; t < rows; t++) {
        const float *row = x + t * x_stride;
        const float u = unit[t] = int8_row_unit(row, cols, 63.0f);
        int8_t *hi = out + t * cols, *lo = out + (rows + t) * cols;
        for (int64_t c = 0; c < cols; c++) {
            const float scaled = row[c] / u, h = nearbyintf(scaled);
            hi[c] = (int8_t)h;
            lo[c] = (int8_t)nearbyintf((scaled - h) * 126.0f);
        }
    }
}

void write_kv_int8(const float *x, int64_t x_stride, int64_t tokens, int64_t heads, int64_t head_dim,
                   const int64_t *slots, const int64_t *layout, int8_t *data, float *scales) {
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t offset = slot_offset(slots[t], layout);
        for (int64_t h = 0; h < heads; h++) {
            const float *row = x + t * x_stride + h * head_dim;
            const float scale = row_max_abs(row, head_dim) / 127.0f;
            const float inverse = scale == 0.0f ? 0.0f : 1.0f / scale;
            const int64_t slot = slots[t] * heads + h;
            int8_t *values = data + offset + h * layout[LAYOUT_HEAD];
            for (int64_t d = 0; d < head_dim; d++) {
                const float q = nearbyintf(row[d] * inverse);
                values[d] = (int8_t)(q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q));
            }
            scales[slot] = scale;
        }
    }
}
