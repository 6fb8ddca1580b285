/* Paged decode attention on CPU, float32: one query token per sequence.
 *
 * Reads each sequence's keys and values straight from their cache blocks (no gather copy, no
 * padding to the longest sequence): one pass over the sequence's K slots scores every query
 * head, a softmax per head, then one pass over its V slots. Parallel over sequences (OpenMP).
 *
 * q, out:            [num_seqs, num_heads, head_dim]
 * k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_dim]
 * block_tables:      [num_seqs, max_blocks] (int64), seq_lens: [num_seqs] (int64)
 * All arrays are contiguous. Returns 0, or < 0 for unsupported shapes / out of memory.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_GROUP 8

static inline float hsum(float *lanes, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += lanes[i];
    return sum;
}

/* scores[g] = q_g . k for the `group` query heads (rows of q, head_dim apart) sharing one K row:
 * each K chunk is loaded once and feeds `group` independent FMA chains. */
static inline void group_dots(const float *q, const float *k, int64_t group, int64_t n, float *scores) {
#ifdef __AVX2__
    if (group <= MAX_GROUP && n % 8 == 0) {
        __m256 acc[MAX_GROUP];
        for (int64_t g = 0; g < group; g++) acc[g] = _mm256_setzero_ps();
        for (int64_t d = 0; d < n; d += 8) {
            const __m256 kv = _mm256_loadu_ps(k + d);
            for (int64_t g = 0; g < group; g++) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * n + d), kv, acc[g]);
        }
        float lanes[8];
        for (int64_t g = 0; g < group; g++) {
            _mm256_storeu_ps(lanes, acc[g]);
            scores[g] = hsum(lanes, 8);
        }
        return;
    }
#endif
    for (int64_t g = 0; g < group; g++) {
        float sum = 0.0f;
        for (int64_t d = 0; d < n; d++) sum += q[g * n + d] * k[d];
        scores[g] = sum;
    }
}

static inline void axpy(float *acc, float p, const float *v, int64_t n) {
    int64_t d = 0;
#ifdef __AVX2__
    const __m256 pv = _mm256_set1_ps(p);
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + d), _mm256_loadu_ps(acc + d)));
#endif
    for (; d < n; d++) acc[d] += p * v[d];
}

int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int64_t *block_tables, const int64_t *seq_lens, float *out,
                               int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale,
                               int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    if (group * num_kv_heads != num_heads) return -1;
    const int64_t slot_stride = num_kv_heads * head_dim;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t len = seq_lens[s];
        const int64_t *table = block_tables + s * max_blocks;
        const float *qs = q + s * num_heads * head_dim;
        float *scores = malloc(sizeof(float) * num_heads * (len > 0 ? len : 1));  /* [head][t] */
        float *acc = calloc(num_heads * head_dim, sizeof(float));
        float *row_max = malloc(sizeof(float) * num_heads);
        if (!scores || !acc || !row_max) {
            free(scores), free(acc), free(row_max);
            failed = 1;
            continue;
        }
        for (int64_t i = 0; i < num_heads; i++) row_max[i] = -INFINITY;
        for (int64_t t = 0; t < len; t++) {
            const float *k = k_cache + (table[t / block_size] * block_size + t % block_size) * slot_stride;
            for (int64_t h = 0; h < num_kv_heads; h++) {
                float dots[MAX_GROUP];
                for (int64_t g0 = 0; g0 < group; g0 += MAX_GROUP) {
                    const int64_t n = group - g0 < MAX_GROUP ? group - g0 : MAX_GROUP;
                    group_dots(qs + (h * group + g0) * head_dim, k + h * head_dim, n, head_dim, dots);
                    for (int64_t g = 0; g < n; g++) {
                        const int64_t i = h * group + g0 + g;
                        const float score = dots[g] * scale;
                        scores[i * len + t] = score;
                        if (score > row_max[i]) row_max[i] = score;
                    }
                }
            }
        }
        for (int64_t i = 0; i < num_heads; i++) {
            float sum = 0.0f, *row = scores + i * len;
            for (int64_t t = 0; t < len; t++) sum += (row[t] = expf(row[t] - row_max[i]));
            row_max[i] = 1.0f / sum; /* now the normalizer */
        }
        for (int64_t t = 0; t < len; t++) {
            const float *v = v_cache + (table[t / block_size] * block_size + t % block_size) * slot_stride;
            for (int64_t i = 0; i < num_heads; i++)
                axpy(acc + i * head_dim, scores[i * len + t], v + (i / group) * head_dim, head_dim);
        }
        float *o = out + s * num_heads * head_dim;
        for (int64_t i = 0; i < num_heads * head_dim; i++) o[i] = acc[i] * row_max[i / head_dim];
        free(scores), free(acc), free(row_max);
    }
    return failed ? -2 : 0;
}
