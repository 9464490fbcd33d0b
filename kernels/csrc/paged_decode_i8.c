/* Paged decode attention over the 8-bit KV cache (baton/cache/kv_cache.py), bf16 queries and
 * outputs: what paged_decode.c does for a bf16 cache, reading half the bytes, in integer dot
 * products (AVX-512 VNNI) so that it does not do more arithmetic than the bf16 kernel either.
 *
 * A value is int8 x the fp32 scale of its row (token t, KV head h), which sits at
 *   scales[b * scale_block_stride + t * kv_heads + h]
 * beside the values' layout of paged_decode.c. The scales factor out of both sums:
 *   score_j(t) = k_scale(t) * (q_j . k8_t),   out_j = sum_t (p_j(t) v_scale(t)) v8_t.
 * Keys: each query head is rounded to int8 (its own scale, amax / 127, as the cache rows are)
 * and meets 64 key bytes in one VPDPBUSD, which multiplies unsigned by signed bytes: the key
 * bytes are flipped to k8 + 128 and 128 x sum(q8) taken off the sum, so the integer dot product
 * is exact. Values: the weights p_j(t) v_scale(t) are rounded to int16 (each head's own scale)
 * and meet two tokens' values, widened to int16 and interleaved, in one VPDPWSSD. Where this
 * CPU has no AVX-512 VNNI or head_dim is not a multiple of 32, the function refuses and the
 * torch op (kernels/kv_int8.py) serves. */
#include <stdint.h>
#include <string.h>

#include "attend.h"
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HEADS_MAX 4 /* query heads weighed in one pass: 4 x 4 sums of a 64-dim row in registers */
#define MAX_VECS (MAX_HEAD_DIM / 16)

/* The bytes of a row from d on, where a head_dim not in 64s ends inside a vector. */
ALWAYS_INLINE __mmask64 row_mask(int64_t head_dim, int64_t d) {
    return head_dim - d >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (head_dim - d)) - 1;
}

/* q8 = round(q / s) with s = amax / 127 (softmax's `scale` folded in); returns s, and in
 * *bias the 128 x sum(q8) that the flipped key bytes add to each dot product. */
ALWAYS_INLINE float quantize_query(const uint16_t *q, const int64_t head_dim, float scale,
                                   int8_t *q8, int32_t *bias) {
    float amax = 0.f;
    for (int64_t d = 0; d < head_dim; d++) amax = fmaxf(amax, fabsf(from_bf16(q[d])));
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    int32_t sum = 0;
    for (int64_t d = 0; d < head_dim; d++) {
        q8[d] = (int8_t)lrintf(from_bf16(q[d]) / s);
        sum += q8[d];
    }
    *bias = 128 * sum;
    return s * scale;
}

/* scores[j][t0 + i] for the query heads of KV head h over the n <= 16 rows of one block from
 * kb on, from their int8 queries; sb: the block's key scales. */
ALWAYS_INLINE void score_rows_i8(const int8_t *q8, const float *qs, const int32_t *bias,
                                 int64_t q_heads, int64_t kv_heads, int64_t h, const int8_t *kb,
                                 const float *sb, int64_t n, const int64_t head_dim,
                                 float *scores, int64_t stride) {
    const int64_t row_stride = kv_heads * head_dim, group = q_heads / kv_heads;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    float s[16] = {0};
    for (int64_t i = 0; i < n; i++) s[i] = sb[i * kv_heads + h];
    const __m512 ks = _mm512_loadu_ps(s);
    for (int64_t j = h * group; j < (h + 1) * group; j++) {
        const int8_t *q = q8 + j * head_dim;
        __m512 acc[16]; /* int32 lanes */
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) {
            __m512i a = _mm512_setzero_si512();
            if (i < n)
                for (int64_t d = 0; d < head_dim; d += 64) {
                    const __mmask64 r = row_mask(head_dim, d);
                    const __m512i k = _mm512_maskz_loadu_epi8(r, kb + i * row_stride + h * head_dim + d);
                    a = _mm512_dpbusd_epi32(a, _mm512_xor_si512(k, flip),
                                            _mm512_maskz_loadu_epi8(r, q + d));
                }
            acc[i] = _mm512_castsi512_ps(a);
        }
        const __m512i dot = _mm512_sub_epi32(_mm512_castps_si512(sum16_epi32(acc)),
                                             _mm512_set1_epi32(bias[j]));
        _mm512_mask_storeu_ps(scores + j * stride, (__mmask16)((1u << n) - 1),
                              _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), ks),
                                            _mm512_set1_ps(qs[j])));
    }
}

/* Each head's weights p_j(t) v_scale(t), in place over its probabilities as int16, and the
 * factor they were multiplied by: 32767 / max, or less where the int32 sums could overflow
 * (127 x the sum of the rounded weights must stay under 2^30). */
ALWAYS_INLINE float weights_i16(float *p, const float *v_scale, int64_t scale_block_stride,
                                int64_t h, int64_t kv_heads, const int64_t *table, int64_t first,
                                int64_t ctx, int64_t block_size) {
    float wmax = 0.f, wsum = 0.f;
    for (int64_t t0 = first / block_size * block_size; t0 < ctx; t0 += block_size) {
        const float *sb = v_scale + table[t0 / block_size] * scale_block_stride + h;
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        for (int64_t i = t0 < first ? first - t0 : 0; i < n; i++) {
            p[t0 + i] *= sb[i * kv_heads];
            wmax = fmaxf(wmax, p[t0 + i]);
            wsum += p[t0 + i];
        }
    }
    if (wmax == 0.f) wmax = wsum = 1.f;
    const float factor = fminf(32767.f / wmax, (1073741824.f / 127.f - 0.5f * ctx) / wsum);
    int16_t *w = (int16_t *)p; /* 16 written over the first half of the 16 just read */
    for (int64_t t = first; t < ctx; t += 16) {
        const __mmask16 m = ctx - t < 16 ? (__mmask16)((1u << (ctx - t)) - 1) : 0xFFFF;
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + t), _mm512_set1_ps(factor));
        _mm256_mask_storeu_epi16(w + t, m, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(x)));
    }
    w[ctx] = 0; /* the pair of a lone last row (the window's pairs may start at odd rows) */
    return factor;
}

/* sums[j] += sum_t w_j(t) v8_t over one block's `rows` value rows from vb on, for up to
 * HEADS_MAX query heads of one KV head, whose int16 weights start at w[j * w_stride]: two rows
 * at a time, widened and interleaved; the int32 sums in registers for the block. */
ALWAYS_INLINE void weigh_block_i8(int32_t *sums, const int16_t *w, int64_t w_stride,
                                  int64_t heads, int64_t t0, const int8_t *vb, int64_t rows,
                                  int64_t row_stride, const int64_t head_dim) {
    __m512i acc[HEADS_MAX][MAX_VECS];
    for (int64_t j = 0; j < HEADS_MAX; j++)
        for (int64_t v = 0; v < head_dim / 16; v++)
            acc[j][v] = j < heads ? _mm512_loadu_si512(sums + j * head_dim + 16 * v)
                                  : _mm512_setzero_si512();
    for (int64_t i = 0; i < rows; i += 2) {
        const int8_t *x = vb + i * row_stride, *y = x + row_stride;
        __m512i xy[MAX_VECS];
        for (int64_t d = 0; d < head_dim; d += 32) {
            const __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(x + d)));
            const __m512i b = i + 1 < rows
                ? _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(y + d)))
                : _mm512_setzero_si512();
            xy[d / 16] = _mm512_unpacklo_epi16(a, b);
            xy[d / 16 + 1] = _mm512_unpackhi_epi16(a, b);
        }
        _Pragma("GCC unroll 4") for (int64_t j = 0; j < HEADS_MAX; j++) {
            if (j >= heads) break;
            int32_t pair;
            memcpy(&pair, w + j * w_stride + t0 + i, sizeof pair);
            const __m512i wv = _mm512_set1_epi32(pair);
            for (int64_t v = 0; v < head_dim / 16; v++)
                acc[j][v] = _mm512_dpwssd_epi32(acc[j][v], xy[v], wv);
        }
    }
    for (int64_t j = 0; j < heads; j++)
        for (int64_t v = 0; v < head_dim / 16; v++)
            _mm512_storeu_si512(sums + j * head_dim + 16 * v, acc[j][v]);
}

/* out[j] = sums[j] / factor[j], its dims put back in order, rounded to bf16. */
ALWAYS_INLINE void finish_i8(const int32_t *sums, const float *factor, int64_t q_heads,
                             const int64_t head_dim, uint16_t *out) {
    for (int64_t j = 0; j < q_heads; j++) {
        const __m512 inv = _mm512_set1_ps(1.f / factor[j]);
        for (int64_t d = j * head_dim; d < (j + 1) * head_dim; d += 32) {
            __m512 a, b;
            deinterleave(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sums + d)), inv),
                         _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sums + d + 16)), inv),
                         &a, &b);
            _mm256_storeu_si256((__m256i *)(out + d), (__m256i)_mm512_cvtneps_pbh(a));
            _mm256_storeu_si256((__m256i *)(out + d + 16), (__m256i)_mm512_cvtneps_pbh(b));
        }
    }
}

/* One sequence, block by block, as paged_decode.c's attend_avx512 walks it: every head's
 * scores over a block's keys, the softmax and weights, every head's sums over a block's
 * values. `work` holds q_heads x ctx floats of scores, then the int8 queries, their scales,
 * biases and weight factors, then the int32 sums. */
ALWAYS_INLINE void attend_i8(const uint16_t *q, const int8_t *k_cache, const int8_t *v_cache,
                             const float *k_scale, const float *v_scale, int64_t block_stride,
                             int64_t scale_block_stride, const int64_t *table, int64_t ctx,
                             int64_t q_heads, int64_t kv_heads, const int64_t head_dim,
                             int64_t block_size, float scale, int64_t first, float softcap,
                             float *work, uint16_t *out) {
    const int64_t group = q_heads / kv_heads, row_stride = kv_heads * head_dim;
    const int64_t nblocks = (ctx + block_size - 1) / block_size, block_bytes = block_size * row_stride;
    const int64_t b0 = first / block_size;
    float *scores = work, *qs = scores + q_heads * ctx, *factor = qs + q_heads;
    int32_t *bias = (int32_t *)(factor + q_heads), *sums = bias + q_heads;
    int8_t *q8 = (int8_t *)(sums + q_heads * head_dim);
    for (int64_t j = 0; j < q_heads; j++)
        qs[j] = quantize_query(q + j * head_dim, head_dim, scale, q8 + j * head_dim, bias + j);
    for (int64_t b = b0; b < nblocks; b++) {
        const int64_t t0 = b * block_size, n = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int8_t *kb = k_cache + table[b] * block_stride;
        const float *sb = k_scale + table[b] * scale_block_stride;
        const int64_t chunks = (n + 15) / 16;
        for (int64_t i0 = b == b0 ? first - t0 : 0; i0 < n; i0 += 16)
            for (int64_t h = 0; h < kv_heads; h++) {
                prefetch_part(k_cache, block_stride, table, b0, b, nblocks, block_bytes,
                              h + kv_heads * (i0 / 16), kv_heads * chunks);
                score_rows_i8(q8, qs, bias, q_heads, kv_heads, h, kb + i0 * row_stride,
                              sb + i0 * kv_heads, n - i0 < 16 ? n - i0 : 16, head_dim,
                              scores + t0 + i0, ctx);
            }
    }
    for (int64_t j = 0; j < q_heads; j++) {
        soft_cap(scores + j * ctx + first, ctx - first, softcap);
        softmax(scores + j * ctx + first, ctx - first);
        factor[j] = weights_i16(scores + j * ctx, v_scale, scale_block_stride, j / group,
                                kv_heads, table, first, ctx, block_size);
    }
    memset(sums, 0, (size_t)(q_heads * head_dim) * sizeof(int32_t));
    const int16_t *w = (const int16_t *)scores;
    const int64_t passes = (group + HEADS_MAX - 1) / HEADS_MAX; /* per KV head */
    for (int64_t b = b0; b < nblocks; b++) {
        const int64_t t0 = b * block_size, n = ctx - t0 < block_size ? ctx - t0 : block_size;
        const int64_t s = b == b0 ? first - t0 : 0; /* the rows the window sees */
        const int8_t *vb = v_cache + table[b] * block_stride + s * row_stride;
        for (int64_t h = 0; h < kv_heads; h++)
            for (int64_t j = h * group; j < (h + 1) * group; j += HEADS_MAX)
                prefetch_part(v_cache, block_stride, table, b0, b, nblocks, block_bytes,
                              h * passes + (j - h * group) / HEADS_MAX, kv_heads * passes),
                weigh_block_i8(sums + j * head_dim, w + 2 * j * ctx, 2 * ctx,
                               (h + 1) * group - j < HEADS_MAX ? (h + 1) * group - j : HEADS_MAX,
                               t0 + s, vb + h * head_dim, n - s, row_stride, head_dim);
    }
    finish_i8(sums, factor, q_heads, head_dim, out);
}
#endif

/* The batch's sequences are shared out over the OpenMP threads, whole sequences each. */
int paged_decode_i8(const uint16_t *q, const int8_t *k_cache, const int8_t *v_cache,
                    const float *k_scale, const float *v_scale, int64_t block_stride,
                    int64_t scale_block_stride, const int64_t *tables, int64_t table_stride,
                    const int64_t *ctx_lens, int64_t batch, int64_t q_heads, int64_t kv_heads,
                    int64_t head_dim, int64_t block_size, float scale, int64_t window,
                    float softcap, uint16_t *out) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (head_dim > MAX_HEAD_DIM || head_dim % 32 || q_heads % kv_heads) return -1;
    int64_t max_ctx = 1;
    for (int64_t b = 0; b < batch; b++) max_ctx = ctx_lens[b] > max_ctx ? ctx_lens[b] : max_ctx;
    int failed = 0;
    _Pragma("omp parallel for schedule(dynamic)")
    for (int64_t b = 0; b < batch; b++) {
        float *work = scratch(q_heads * (max_ctx + 3 + head_dim + head_dim / 4));
        if (work == NULL) {
            _Pragma("omp atomic write") failed = 1;
            continue;
        }
        const uint16_t *qb = q + b * q_heads * head_dim;
        uint16_t *ob = out + b * q_heads * head_dim;
        const int64_t *table = tables + b * table_stride, ctx = ctx_lens[b];
        const int64_t first = first_seen(ctx, window);
        if (head_dim == 64)
            attend_i8(qb, k_cache, v_cache, k_scale, v_scale, block_stride, scale_block_stride,
                      table, ctx, q_heads, kv_heads, 64, block_size, scale, first, softcap, work,
                      ob);
        else
            attend_i8(qb, k_cache, v_cache, k_scale, v_scale, block_stride, scale_block_stride,
                      table, ctx, q_heads, kv_heads, head_dim, block_size, scale, first, softcap,
                      work, ob);
    }
    return failed ? -1 : 0;
#else
    (void)q, (void)k_cache, (void)v_cache, (void)k_scale, (void)v_scale, (void)block_stride;
    (void)scale_block_stride, (void)tables, (void)table_stride, (void)ctx_lens, (void)batch;
    (void)q_heads, (void)kv_heads, (void)head_dim, (void)block_size, (void)scale, (void)window;
    (void)softcap, (void)out;
    return -1;
#endif
}
