/* A Llama decoder stack over one decode step (one new token per sequence), in one call.
 *
 * Layer by layer it runs the kernels that the model's Python path calls one at a time (RMSNorm,
 * the panel GEMMs, RoPE, the K/V write, paged decode attention, SiLU-and-multiply) in the same
 * order over the same values, so its result is the Python path's, bit for bit. What it saves is
 * the interpreter, torch's dispatch and ctypes around a dozen kernels per layer: time in which
 * the other OpenMP threads only wait.
 *
 * x:       [m, hidden] float32, the residual stream (the embedded tokens), updated in place
 * out:     [m, hidden], the final norm of the residual stream
 * shape:   num_layers, hidden, intermediate, num_heads, num_kv_heads, head_dim, and the format of
 *          every projection: 0 float32 panels (packed_sgemm.c), 1 int8 panels (packed_int8.c: W8A8
 *          or exact activations, as each weight's header says)
 * weights: per layer the input norm, q/k/v panels, o panels, post-attention norm, gate/up panels
 *          (gate's outputs then up's), down panels; then the final norm (norms: float32)
 * caches:  per layer K's and V's values, then K's and V's scales: float32 values and NULL scales, or
 *          int8 values with a scale per slot and KV head (paged_decode_attention.c); the values
 *          laid out by `layout` (cache_layout.h)
 * positions, slots: [m] int64; block_tables: [m, max_blocks] int64; seq_lens: [m] int64
 * Returns 0; -1 where a position has no row in the rotary tables; -2 out of memory or a shape
 * the kernels do not take.
 */
#include <stdint.h>
#include <stdlib.h>
#include "kernels.h"

enum { LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, FORMAT };
enum { FLOAT_PANELS, INT8_PANELS };
enum { INPUT_NORM, QKV, O, POST_NORM, GATE_UP, DOWN, WEIGHTS_PER_LAYER };

typedef struct {
    void *k, *v;                /* float32 or int8 values */
    float *k_scales, *v_scales; /* int8 caches only, else NULL */
} LayerCache;

typedef struct {
    int64_t m, hidden, intermediate, heads, kv_heads, dim, qkv_width, qk_width;
    const int64_t *layout, *positions, *slots, *block_tables, *seq_lens;
    const float *cos, *signed_sin;
    int64_t table_rows, max_blocks;
    float eps, scale;
    int threads, int8;
    /* buffers */
    float *normed, *qkv, *qk /* q and k heads after RoPE */, *attended, *gate_up, *activated;
    float *delta; /* what the last block computed, to add to the residual stream */
} Step;

/* This step's K and V into the layer's cache, then every sequence's attention into s->attended;
 * a thread done with its sequences asks for its first panel of `next` (the o projection). */
static int attend(const Step *s, const LayerCache *c, const NextPanels *next) {
    const int64_t m = s->m, heads = s->heads, kv_heads = s->kv_heads, dim = s->dim;
    const float *k = s->qk + heads * dim, *v = s->qkv + s->qk_width;
    Lines then[s->threads];
    for (int t = 0; t < s->threads; t++)
        then[t] = s->int8 ? int8_first_panel(next, t, s->threads) : sgemm_first_panel(next, t, s->threads);
    if (c->k_scales) {
        write_kv_int8(k, s->qk_width, m, kv_heads, dim, s->slots, s->layout, c->k, c->k_scales);
        write_kv_int8(v, s->qkv_width, m, kv_heads, dim, s->slots, s->layout, c->v, c->v_scales);
        return paged_decode_attention_i8(s->qk, s->qk_width, c->k, c->v, c->k_scales, c->v_scales, s->block_tables,
                                         s->seq_lens, s->attended, m, heads, kv_heads, dim, s->layout, s->max_blocks,
                                         s->scale, s->threads, then);
    }
    write_kv_f32(k, v, m, kv_heads, dim, s->qk_width, s->qkv_width, s->slots, s->layout, c->k, c->v);
    return paged_decode_attention_f32(s->qk, s->qk_width, c->k, c->v, s->block_tables, s->seq_lens, s->attended, m,
                                      heads, kv_heads, dim, s->layout, s->max_blocks, s->scale, s->threads, then);
}

/* y[m, n] = x[m, k] . w[n, :] in the stack's weight format; 0 or a kernel's error. `next`: the
 * weights the stack multiplies by next (or NULL), whose first panels the GEMM asks for. */
static int linear(const Step *s, const float *x, int64_t k, const void *w, int64_t n, float *y,
                  const NextPanels *next) {
    if (s->int8) return int8_gemm_packed_then(x, s->m, k, k, w, n, NULL, y, n, s->threads, next);
    return sgemm_packed_then(x, s->m, k, k, w, n, NULL, y, n, s->threads, next);
}

/* x += the previous layer's MLP output (none before the first layer), then one decoder layer;
 * its MLP output is left in s->delta. `next_qkv`: the next layer's q/k/v weights, or NULL. */
static int decoder_layer(const Step *s, float *x, const void *const *w, const LayerCache *c, int first,
                         const void *next_qkv) {
    const int64_t m = s->m, hidden = s->hidden, dim = s->dim, heads = s->heads, inner = s->intermediate;
    const NextPanels o = {w[O], heads * dim, hidden}, gate_up = {w[GATE_UP], hidden, 2 * inner},
                     down = {w[DOWN], inner, hidden}, qkv = {next_qkv, hidden, s->qkv_width};
    if (first) rms_norm_f32(x, hidden, w[INPUT_NORM], m, hidden, s->eps, s->normed, s->threads);
    else add_rms_norm_f32(x, hidden, s->delta, hidden, w[INPUT_NORM], m, hidden, s->eps, s->normed, s->threads);
    if (linear(s, s->normed, hidden, w[QKV], s->qkv_width, s->qkv, &o)) return -2;
    if (rotary_f32(s->qkv, s->qkv_width, dim, s->positions, s->cos, s->signed_sin, s->table_rows, m,
                   heads + s->kv_heads, dim, s->qk, s->threads))
        return -1;
    if (attend(s, c, &o) || linear(s, s->attended, heads * dim, w[O], hidden, s->delta, &gate_up)) return -2;
    add_rms_norm_f32(x, hidden, s->delta, hidden, w[POST_NORM], m, hidden, s->eps, s->normed, s->threads);
    if (linear(s, s->normed, hidden, w[GATE_UP], 2 * inner, s->gate_up, &down)) return -2;
    silu_mul_f32(s->gate_up, m, inner, s->activated, s->threads);
    return linear(s, s->activated, inner, w[DOWN], hidden, s->delta, next_qkv ? &qkv : NULL) ? -2 : 0;
}

int llama_decode_f32(float *x, int64_t m, const int64_t *shape, const void *const *weights,
                     const LayerCache *caches, const int64_t *layout, const int64_t *positions, const float *cos,
                     const float *signed_sin, int64_t table_rows, const int64_t *slots,
                     const int64_t *block_tables, int64_t max_blocks, const int64_t *seq_lens, float eps,
                     float scale, float *out, int num_threads) {
    const int64_t heads = shape[HEADS], kv_heads = shape[KV_HEADS], dim = shape[HEAD_DIM];
    Step s = {m, shape[HIDDEN], shape[INTERMEDIATE], heads, kv_heads, dim, (heads + 2 * kv_heads) * dim,
              (heads + kv_heads) * dim, layout, positions, slots, block_tables, seq_lens, cos, signed_sin,
              table_rows, max_blocks, eps, scale, num_threads, shape[FORMAT] == INT8_PANELS};
    float **buffers[] = {&s.normed, &s.qkv, &s.qk, &s.attended, &s.gate_up, &s.activated, &s.delta};
    const int64_t floats[] = {s.hidden, s.qkv_width, s.qk_width, heads * dim, 2 * s.intermediate, s.intermediate,
                              s.hidden};
    const int count = sizeof(floats) / sizeof(floats[0]);
    int status = shape[LAYERS] > 0 && (shape[FORMAT] == FLOAT_PANELS || shape[FORMAT] == INT8_PANELS) ? 0 : -2;
    for (int b = 0; b < count; b++) status = (*buffers[b] = malloc(sizeof(float) * m * floats[b])) ? status : -2;
    for (int64_t l = 0; l < shape[LAYERS] && status == 0; l++) {
        const void *const *layer = weights + l * WEIGHTS_PER_LAYER;
        const void *next_qkv = l + 1 < shape[LAYERS] ? layer[WEIGHTS_PER_LAYER + QKV] : NULL;
        status = decoder_layer(&s, x, layer, caches + l, l == 0, next_qkv);
    }
    if (status == 0) /* the last MLP's output, then the final norm */
        add_rms_norm_f32(x, s.hidden, s.delta, s.hidden, weights[shape[LAYERS] * WEIGHTS_PER_LAYER], m, s.hidden, eps,
                         out, num_threads);
    for (int b = 0; b < count; b++) free(*buffers[b]);
    return status;
}
