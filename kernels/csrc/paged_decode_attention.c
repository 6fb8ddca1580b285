/* Paged decode attention on CPU, float32: one query token per sequence.
 *
 * Reads each sequence's keys and values straight from their cache blocks (no gather copy, no
 * padding to the longest sequence): one pass over the sequence's K slots scores every query
 * head, a softmax per head, then one pass over its V slots. Parallel over sequences (OpenMP).
 * With AVX2 and head_dim % 8 == 0, scores are computed 8 tokens at a time (one transpose-reduce
 * instead of 8 horizontal sums) and V is accumulated in registers over tiles of tokens.
 *
 * q, out:            [num_seqs, num_heads, head_dim]
 * k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_dim]
 * block_tables:      [num_seqs, max_blocks] (int64), seq_lens: [num_seqs] (int64)
 * All arrays are contiguous. Returns 0, or < 0 for unsupported shapes / out of memory.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define V_TILE 32

typedef struct {
    const float *q;
    const float *k_cache;
    const float *v_cache;
    const int64_t *rows;  /* rows[t]: element offset of token t's slot in either cache */
    int64_t len, num_heads, group, head_dim;
    float scale;
} Seq;

static inline const float *slot_row(const float *cache, const Seq *s, int64_t t) { return cache + s->rows[t]; }

/* Walks the block table once, so the passes over K and V do no division per token. */
static void slot_rows(const int64_t *table, int64_t len, int64_t block_size, int64_t slot_stride, int64_t *rows) {
    for (int64_t t = 0, b = 0; t < len; b++)
        for (int64_t o = 0; o < block_size && t < len; o++, t++) rows[t] = (table[b] * block_size + o) * slot_stride;
}

/* scores[i * len + t] = scale * q_i . k_t(head of i), for t in [from, len): portable loop. */
static void scores_scalar(const Seq *s, float *scores, int64_t from) {
    for (int64_t t = from; t < s->len; t++) {
        const float *k = slot_row(s->k_cache, s, t);
        for (int64_t i = 0; i < s->num_heads; i++) {
            const float *qi = s->q + i * s->head_dim, *ki = k + (i / s->group) * s->head_dim;
            float sum = 0.0f;
            for (int64_t d = 0; d < s->head_dim; d++) sum += qi[d] * ki[d];
            scores[i * s->len + t] = sum * s->scale;
        }
    }
}

/* acc[i] += sum_t p_i[t] * v_t(head of i), for t in [from, to): portable loop. */
static void values_scalar(const Seq *s, const float *probs, float *acc, int64_t from, int64_t to) {
    for (int64_t t = from; t < to; t++) {
        const float *v = slot_row(s->v_cache, s, t);
        for (int64_t i = 0; i < s->num_heads; i++) {
            const float p = probs[i * s->len + t], *vi = v + (i / s->group) * s->head_dim;
            float *a = acc + i * s->head_dim;
            for (int64_t d = 0; d < s->head_dim; d++) a[d] += p * vi[d];
        }
    }
}

#ifdef __AVX2__
/* r[j] = horizontal sum of a[j], j = 0..7 */
static inline __m256 reduce8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static void scores_avx2(const Seq *s, float *scores) {
    const __m256 scale = _mm256_set1_ps(s->scale);
    int64_t t = 0;
    for (; t + 8 <= s->len; t += 8) {
        const float *k[8];
        for (int j = 0; j < 8; j++) k[j] = slot_row(s->k_cache, s, t + j);
        for (int64_t i = 0; i < s->num_heads; i++) {
            const float *qi = s->q + i * s->head_dim;
            const int64_t offset = (i / s->group) * s->head_dim;
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < s->head_dim; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qi + d);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + offset + d), acc[j]);
            }
            _mm256_storeu_ps(scores + i * s->len + t, _mm256_mul_ps(reduce8(acc), scale));
        }
    }
    scores_scalar(s, scores, t);
}

static void values_avx2(const Seq *s, const float *probs, float *acc) {
    for (int64_t t0 = 0; t0 < s->len; t0 += V_TILE) {
        const int64_t n = s->len - t0 < V_TILE ? s->len - t0 : V_TILE;
        const float *v[V_TILE];
        for (int64_t j = 0; j < n; j++) v[j] = slot_row(s->v_cache, s, t0 + j);
        for (int64_t i = 0; i < s->num_heads; i++) {
            const float *p = probs + i * s->len + t0;
            const int64_t offset = (i / s->group) * s->head_dim;
            float *a = acc + i * s->head_dim;
            int64_t d = 0;
            for (; d + 32 <= s->head_dim; d += 32) {  /* 4 registers of the output stay put */
                __m256 a0 = _mm256_loadu_ps(a + d), a1 = _mm256_loadu_ps(a + d + 8);
                __m256 a2 = _mm256_loadu_ps(a + d + 16), a3 = _mm256_loadu_ps(a + d + 24);
                for (int64_t j = 0; j < n; j++) {
                    const __m256 pj = _mm256_set1_ps(p[j]);
                    const float *vj = v[j] + offset + d;
                    a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj), a0);
                    a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8), a1);
                    a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 16), a2);
                    a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 24), a3);
                }
                _mm256_storeu_ps(a + d, a0), _mm256_storeu_ps(a + d + 8, a1);
                _mm256_storeu_ps(a + d + 16, a2), _mm256_storeu_ps(a + d + 24, a3);
            }
            for (; d < s->head_dim; d += 8) {
                __m256 a0 = _mm256_loadu_ps(a + d);
                for (int64_t j = 0; j < n; j++)
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v[j] + offset + d), a0);
                _mm256_storeu_ps(a + d, a0);
            }
        }
    }
}
#endif

/* out = softmax(scores) V for one sequence; scores [num_heads, len], acc [num_heads, head_dim] zeroed. */
static void attend(const Seq *s, float *scores, float *acc, float *out) {
    const int vectorized =
#ifdef __AVX2__
        s->head_dim % 8 == 0;
#else
        0;
#endif
#ifdef __AVX2__
    if (vectorized) scores_avx2(s, scores);
#endif
    if (!vectorized) scores_scalar(s, scores, 0);
    for (int64_t i = 0; i < s->num_heads; i++) {
        float *row = scores + i * s->len, max = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < s->len; t++) max = row[t] > max ? row[t] : max;
        for (int64_t t = 0; t < s->len; t++) sum += (row[t] = expf(row[t] - max));
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < s->len; t++) row[t] *= inv;
    }
#ifdef __AVX2__
    if (vectorized) values_avx2(s, scores, acc);
#endif
    if (!vectorized) values_scalar(s, scores, acc, 0, s->len);
    for (int64_t i = 0; i < s->num_heads * s->head_dim; i++) out[i] = acc[i];
}

int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int64_t *block_tables, const int64_t *seq_lens, float *out,
                               int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale,
                               int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    if (group * num_kv_heads != num_heads) return -1;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t i = 0; i < num_seqs; i++) {
        const int64_t len = seq_lens[i];
        int64_t *rows = malloc(sizeof(int64_t) * (len > 0 ? len : 1));
        float *scores = malloc(sizeof(float) * num_heads * (len > 0 ? len : 1));
        float *acc = calloc(num_heads * head_dim, sizeof(float));
        if (!rows || !scores || !acc) {
            failed = 1;
        } else {
            slot_rows(block_tables + i * max_blocks, len, block_size, num_kv_heads * head_dim, rows);
            const Seq s = {q + i * num_heads * head_dim, k_cache, v_cache, rows, len, num_heads, group, head_dim,
                           scale};
            attend(&s, scores, acc, out + i * num_heads * head_dim);
        }
        free(rows);
        free(scores);
        free(acc);
    }
    return failed ? -2 : 0;
}
