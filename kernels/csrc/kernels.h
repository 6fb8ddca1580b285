/* The kernels of this library that others in it call (csrc/decode_stack.c). */
#pragma once
#include <stdint.h>

int sgemm_packed(const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n,
                 const float *bias, float *y, int64_t ldy, int num_threads);
/* The weights of the linear that runs next (k inputs, n outputs), in the format of the GEMM given
 * them, so that it can ask for their first panels. */
typedef struct {
    const void *weights;
    int64_t k, n;
} NextPanels;
int sgemm_packed_then(const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n,
                      const float *bias, float *y, int64_t ldy, int num_threads, const NextPanels *next);
/* Bytes from `start` on (NULL, 0: nothing). */
typedef struct {
    const void *start;
    int64_t bytes;
} Lines;
/* The first panel that thread t of num_threads reads in `next`: float panels, int8 panels. */
Lines sgemm_first_panel(const NextPanels *next, int64_t t, int num_threads);
Lines int8_first_panel(const NextPanels *next, int64_t t, int num_threads);
int int8_gemm_packed(const float *x, int64_t m, int64_t k, int64_t ldx, const void *weight, int64_t n,
                     const float *bias, float *y, int64_t ldy, int num_threads);
int int8_gemm_packed_then(const float *x, int64_t m, int64_t k, int64_t ldx, const void *weight, int64_t n,
                          const float *bias, float *y, int64_t ldy, int num_threads, const NextPanels *next);
float int8_row_unit(const float *x, int64_t cols, float top);
void rms_norm_f32(const float *x, int64_t x_stride, const float *weight, int64_t rows, int64_t cols, float eps,
                  float *out, int num_threads);
void add_rms_norm_f32(float *x, int64_t x_stride, const float *delta, int64_t delta_stride, const float *weight,
                      int64_t rows, int64_t cols, float eps, float *out, int num_threads);
void silu_mul_f32(const float *gate_up, int64_t rows, int64_t n, float *out, int num_threads);
int rotary_f32(const float *x, int64_t token_stride, int64_t head_stride, const int64_t *positions, const float *cos,
               const float *signed_sin, int64_t table_rows, int64_t tokens, int64_t heads, int64_t dim, float *out,
               int num_threads);
void write_kv_f32(const float *k, const float *v, int64_t tokens, int64_t heads, int64_t head_dim, int64_t k_stride,
                  int64_t v_stride, const int64_t *slots, const int64_t *layout, float *k_cache, float *v_cache);
int paged_decode_attention_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                               const int64_t *block_tables, const int64_t *seq_lens, float *out,
                               int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, const int64_t *layout, int64_t max_blocks, float scale,
                               int num_threads, const Lines *then);
void write_kv_int8(const float *x, int64_t x_stride, int64_t tokens, int64_t heads, int64_t head_dim,
                   const int64_t *slots, const int64_t *layout, int8_t *data, float *scales);
int paged_decode_attention_i8(const float *q, int64_t q_stride, const int8_t *k_cache, const int8_t *v_cache,
                              const float *k_scales, const float *v_scales, const int64_t *block_tables,
                              const int64_t *seq_lens, float *out, int64_t num_seqs, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_dim, const int64_t *layout, int64_t max_blocks,
                              float scale, int num_threads, const Lines *then);
