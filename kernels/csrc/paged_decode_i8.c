/* Paged decode attention over the 8-bit KV cache (baton/cache/kv_cache.py), bf16 queries and
 * outputs: what paged_decode.c does for a bf16 cache, reading half the bytes.
 *
 * A value is int8 x the fp32 scale of its row (token t, KV head h), which sits at
 *   scales[b * scale_block_stride + t * kv_heads + h]
 * beside the values' layout of paged_decode.c. The scales factor out of both sums:
 *   score_j(t) = k_scale(t) * (q_j . k8_t),   out_j = sum_t (p_j(t) v_scale(t)) v8_t,
 * so each row is converted to fp32 once and met by every query head of its KV head: the keys
 * 16 rows at a time into a scratch tile that each query head's dot products read from L1
 * (summed 16 at once, sum16), the values row by row against that many running sums in
 * registers. Where this CPU has no AVX-512 or head_dim is not a multiple of 16, the function
 * refuses and the torch op (kernels/kv_int8.py) serves. */
#include <stdint.h>

#include "attend.h"
#include "common.h"

#if defined(__AVX512F__)
#define HEADS_MAX 4 /* query heads weighed in one pass: 4 x 4 sums of a 64-dim row in registers */

ALWAYS_INLINE __m512 load_i8(const int8_t *x) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)x)));
}

/* scores[j][t] for the `group` query heads of one KV head (qf: theirs, scaled, fp32). */
ALWAYS_INLINE void score_heads_i8(const float *qf, int64_t group, const int8_t *k_cache,
                                  const float *k_scale, int64_t block_stride,
                                  int64_t scale_block_stride, int64_t h, int64_t kv_heads,
                                  const int64_t *table, int64_t ctx, const int64_t head_dim,
                                  int64_t block_size, float *tile, float *scores) {
    const int64_t row_stride = kv_heads * head_dim;
    for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
        const int64_t block = table[t0 / block_size], n = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int8_t *kb = k_cache + block * block_stride + h * head_dim;
        const float *sb = k_scale + block * scale_block_stride + h;
        if (t0 + block_size < ctx) prefetch(k_cache + table[t0 / block_size + 1] * block_stride, block_size * row_stride);
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            const int64_t m = n - i0 < 16 ? n - i0 : 16;
            float s[16] = {0};
            for (int64_t i = 0; i < m; i++) {
                s[i] = sb[(i0 + i) * kv_heads];
                for (int64_t d = 0; d < head_dim; d += 16)
                    _mm512_storeu_ps(tile + i * head_dim + d, load_i8(kb + (i0 + i) * row_stride + d));
            }
            const __m512 ks = _mm512_loadu_ps(s);
            for (int64_t j = 0; j < group; j++) {
                const float *q = qf + j * head_dim;
                __m512 acc[16];
                _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) {
                    acc[i] = _mm512_setzero_ps();
                    if (i < m)
                        for (int64_t d = 0; d < head_dim; d += 16)
                            acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + d),
                                                     _mm512_loadu_ps(tile + i * head_dim + d), acc[i]);
                }
                _mm512_mask_storeu_ps(scores + j * ctx + t0 + i0, (__mmask16)((1u << m) - 1),
                                      _mm512_mul_ps(sum16(acc), ks));
            }
        }
    }
}

/* out[j] = sum_t p[j][t] v(t) for up to HEADS_MAX query heads of one KV head. */
ALWAYS_INLINE void weigh_heads_i8(const float *p, int64_t heads, const int8_t *v_cache,
                                  const float *v_scale, int64_t block_stride,
                                  int64_t scale_block_stride, int64_t h, int64_t kv_heads,
                                  const int64_t *table, int64_t ctx, const int64_t head_dim,
                                  int64_t block_size, uint16_t *out) {
    const int64_t row_stride = kv_heads * head_dim;
    __m512 acc[HEADS_MAX][MAX_HEAD_DIM / 16];
    for (int64_t j = 0; j < HEADS_MAX; j++)
        for (int64_t v = 0; v < head_dim / 16; v++) acc[j][v] = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
        const int64_t block = table[t0 / block_size], n = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int8_t *vb = v_cache + block * block_stride + h * head_dim;
        const float *sb = v_scale + block * scale_block_stride + h;
        for (int64_t i = 0; i < n; i++) {
            __m512 x[MAX_HEAD_DIM / 16];
            for (int64_t v = 0; v < head_dim / 16; v++) x[v] = load_i8(vb + i * row_stride + 16 * v);
            const float vs = sb[i * kv_heads];
            _Pragma("GCC unroll 4") for (int64_t j = 0; j < HEADS_MAX; j++) {
                if (j >= heads) break;
                const __m512 pv = _mm512_set1_ps(p[j * ctx + t0 + i] * vs);
                for (int64_t v = 0; v < head_dim / 16; v++) acc[j][v] = _mm512_fmadd_ps(pv, x[v], acc[j][v]);
            }
        }
    }
    for (int64_t j = 0; j < heads; j++) {
        float o[MAX_HEAD_DIM];
        for (int64_t v = 0; v < head_dim / 16; v++) _mm512_storeu_ps(o + 16 * v, acc[j][v]);
        for (int64_t d = 0; d < head_dim; d++) out[j * head_dim + d] = to_bf16(o[d]);
    }
}

/* One sequence, KV head by KV head. `work` holds group x (ctx + head_dim) + 16 x head_dim. */
ALWAYS_INLINE void attend_i8(const uint16_t *q, const int8_t *k_cache, const int8_t *v_cache,
                             const float *k_scale, const float *v_scale, int64_t block_stride,
                             int64_t scale_block_stride, const int64_t *table, int64_t ctx,
                             int64_t q_heads, int64_t kv_heads, const int64_t head_dim,
                             int64_t block_size, float scale, float *work, uint16_t *out) {
    const int64_t group = q_heads / kv_heads;
    float *scores = work, *qf = scores + group * ctx, *tile = qf + group * head_dim;
    for (int64_t h = 0; h < kv_heads; h++) {
        for (int64_t i = 0; i < group * head_dim; i++) qf[i] = from_bf16(q[h * group * head_dim + i]) * scale;
        score_heads_i8(qf, group, k_cache, k_scale, block_stride, scale_block_stride, h, kv_heads,
                       table, ctx, head_dim, block_size, tile, scores);
        for (int64_t j = 0; j < group; j++) softmax(scores + j * ctx, ctx);
        for (int64_t j0 = 0; j0 < group; j0 += HEADS_MAX)
            weigh_heads_i8(scores + j0 * ctx, group - j0 < HEADS_MAX ? group - j0 : HEADS_MAX,
                           v_cache, v_scale, block_stride, scale_block_stride, h, kv_heads, table,
                           ctx, head_dim, block_size, out + (h * group + j0) * head_dim);
    }
}
#endif

/* The batch's sequences are shared out over the OpenMP threads, whole sequences each. */
int paged_decode_i8(const uint16_t *q, const int8_t *k_cache, const int8_t *v_cache,
                    const float *k_scale, const float *v_scale, int64_t block_stride,
                    int64_t scale_block_stride, const int64_t *tables, int64_t table_stride,
                    const int64_t *ctx_lens, int64_t batch, int64_t q_heads, int64_t kv_heads,
                    int64_t head_dim, int64_t block_size, float scale, uint16_t *out) {
#if defined(__AVX512F__)
    if (head_dim > MAX_HEAD_DIM || head_dim % 16 || q_heads % kv_heads) return -1;
    const int64_t group = q_heads / kv_heads;
    int64_t max_ctx = 1;
    for (int64_t b = 0; b < batch; b++) max_ctx = ctx_lens[b] > max_ctx ? ctx_lens[b] : max_ctx;
    int failed = 0;
    _Pragma("omp parallel for schedule(dynamic)")
    for (int64_t b = 0; b < batch; b++) {
        float *work = scratch(group * (max_ctx + head_dim) + 16 * head_dim);
        if (work == NULL) {
            _Pragma("omp atomic write") failed = 1;
            continue;
        }
        const uint16_t *qb = q + b * q_heads * head_dim;
        uint16_t *ob = out + b * q_heads * head_dim;
        const int64_t *table = tables + b * table_stride;
        if (head_dim == 64)
            attend_i8(qb, k_cache, v_cache, k_scale, v_scale, block_stride, scale_block_stride,
                      table, ctx_lens[b], q_heads, kv_heads, 64, block_size, scale, work, ob);
        else
            attend_i8(qb, k_cache, v_cache, k_scale, v_scale, block_stride, scale_block_stride,
                      table, ctx_lens[b], q_heads, kv_heads, head_dim, block_size, scale, work, ob);
    }
    return failed ? -1 : 0;
#else
    (void)q, (void)k_cache, (void)v_cache, (void)k_scale, (void)v_scale, (void)block_stride;
    (void)scale_block_stride, (void)tables, (void)table_stride, (void)ctx_lens, (void)batch;
    (void)q_heads, (void)kv_heads, (void)head_dim, (void)block_size, (void)scale, (void)out;
    return -1;
#endif
}
