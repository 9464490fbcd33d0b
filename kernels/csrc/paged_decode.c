/* Paged decode attention on a CPU: one query token per sequence against its cached context,
 * read block by block where it lies (no gather, no padding to the longest sequence).
 *
 * Cache element (block b, slot t, KV head h, dim d) sits at
 *   cache[b * block_stride + (t * kv_heads + h) * head_dim + d]
 * (baton/cache/kv_cache.py: one layer's K or V view). Two implementations of the same math:
 * AVX-512 (with BF16 dot products) where this CPU has it and head_dim is a multiple of 32,
 * and plain C loops, which the compiler vectorizes, for everything else. Scores, softmax and
 * the weighted sums are fp32; bf16 inputs are exact in fp32, outputs rounded once on store.
 * A sliding-window layer's query sees only the last `window` positions (0: all of them), and
 * Gemma 2's scores are soft-capped before the softmax (`softcap`; 0: not).
 * The batch's sequences are shared out over OpenMP threads.
 * Built by kernels/native.py with -O3 -march=native -ffast-math (expf vectorized through
 * glibc's vector math) and -fopenmp where the compiler has it. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attend.h"
#include "common.h"

/* The plain C path (no AVX-512 BF16 here, or a head_dim not a multiple of 32).
 * One sequence: every query head against its `ctx` cached tokens. `scores` is [q_heads][ctx],
 * `qf` and `acc` [q_heads][head_dim], `inv` [q_heads]. Called with a constant head_dim where
 * it is a common one, so the compiler unrolls the row loops into whole vectors. */
#define ATTEND_SEQ(NAME, T, LOAD, STORE)                                                       \
    ALWAYS_INLINE void NAME(                                                                   \
        const T *q, const T *k_cache, const T *v_cache, int64_t block_stride,                  \
        const int64_t *table, int64_t ctx, int64_t q_heads, int64_t kv_heads,                  \
        const int64_t head_dim, int64_t block_size, float scale, int64_t first, float softcap, \
        float *scores, float *qf, float *acc, float *inv, T *out) {                            \
        const int64_t group = q_heads / kv_heads, row_stride = kv_heads * head_dim;           \
        const int64_t block_bytes = block_size * row_stride * (int64_t)sizeof(T);             \
        const int64_t nblocks = (ctx + block_size - 1) / block_size;                           \
        const int64_t stride_bytes = block_stride * (int64_t)sizeof(T);                        \
        const int64_t b0 = first / block_size, start = b0 * block_size;                        \
        float row[MAX_HEAD_DIM];                                                               \
        for (int64_t i = 0; i < q_heads * head_dim; i++) qf[i] = LOAD(q[i]) * scale;         \
        for (int64_t t0 = start; t0 < ctx; t0 += block_size) { /* scores[j][t] = q_j . k_t */  \
            const int64_t s = t0 < first ? first - t0 : 0; /* the rows the window sees */     \
            const T *kp = k_cache + table[t0 / block_size] * block_stride + s * row_stride;   \
            const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;                  \
            prefetch_ahead(k_cache, stride_bytes, table, b0, t0 / block_size, nblocks,         \
                           block_bytes);                                                       \
            for (int64_t i = s; i < n; i++, kp += row_stride) {                                \
                for (int64_t h = 0; h < kv_heads; h++) {                                       \
                    for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(kp[h * head_dim + d]); \
                    for (int64_t j = h * group; j < (h + 1) * group; j++) {                    \
                        const float *qj = qf + j * head_dim;                                   \
                        float s = 0.f;                                                         \
                        for (int64_t d = 0; d < head_dim; d++) s += qj[d] * row[d];            \
                        scores[j * ctx + t0 + i] = s;                                          \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int64_t j = 0; j < q_heads; j++) { /* softmax over the positions seen */          \
            float *s = scores + j * ctx, m = -INFINITY, sum = 0.f;                             \
            soft_cap(s + first, ctx - first, softcap);                                         \
            for (int64_t t = first; t < ctx; t++) m = s[t] > m ? s[t] : m;                     \
            for (int64_t t = first; t < ctx; t++) {                                            \
                s[t] = expf(s[t] - m);                                                         \
                sum += s[t];                                                                   \
            }                                                                                  \
            inv[j] = 1.f / sum;                                                                \
        }                                                                                      \
        for (int64_t i = 0; i < q_heads * head_dim; i++) acc[i] = 0.f;                        \
        for (int64_t t0 = start; t0 < ctx; t0 += block_size) {                                \
            const int64_t s = t0 < first ? first - t0 : 0;                                     \
            const T *vp = v_cache + table[t0 / block_size] * block_stride + s * row_stride;   \
            const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;                  \
            prefetch_ahead(v_cache, stride_bytes, table, b0, t0 / block_size, nblocks,         \
                           block_bytes);                                                       \
            for (int64_t i = s; i < n; i++, vp += row_stride) {                                \
                for (int64_t h = 0; h < kv_heads; h++) {                                       \
                    for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(vp[h * head_dim + d]); \
                    for (int64_t j = h * group; j < (h + 1) * group; j++) {                    \
                        float *aj = acc + j * head_dim;                                        \
                        const float p = scores[j * ctx + t0 + i];                              \
                        for (int64_t d = 0; d < head_dim; d++) aj[d] += p * row[d];            \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int64_t i = 0; i < q_heads * head_dim; i++) out[i] = STORE(acc[i] * inv[i / head_dim]); \
    }

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* The same attention in AVX-512, where this CPU has it with BF16 dot products. Per KV head:
 * each query head sharing it scores 16 keys at a time (its slice of each row), the sixteen dot
 * products summed as one vector (sum16) rather than a horizontal sum each; then those query
 * heads are weighed over the values together. bf16 keys meet the bf16 query in VDPBF16PS
 * (exact products, fp32 sums); bf16 values go two tokens at a time against their two
 * probabilities rounded to bf16 (as the torch op rounds them). */
#include <immintrin.h>
#define HAVE_AVX512 1

/* One step of a query's dot product with a key row: one vector's worth of elements. */
static inline __m512 dot_bf16(__m512 acc, const void *q, const uint16_t *k) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q), (__m512bh)_mm512_loadu_si512(k));
}
static inline __m512 dot_f32(__m512 acc, const void *q, const float *k) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k), acc);
}

/* scores[i] = scale * (q . k_i) for one query head over the n <= 16 rows from k on (its KV
 * head's slice of a block's row): sixteen dot products summed as one vector (sum16) rather
 * than a horizontal sum each. EPV: elements per 512-bit vector. */
#define SCORE_ROWS(NAME, T, DOT, EPV)                                                          \
    ALWAYS_INLINE void NAME(const T *q, const T *k, int64_t row_stride, int64_t n,             \
                            const int64_t head_dim, float scale, float *scores) {              \
        __m512 acc[16];                                                                        \
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) {                                \
            acc[i] = _mm512_setzero_ps();                                                      \
            if (i < n)                                                                         \
                for (int64_t d = 0; d < head_dim; d += EPV)                                    \
                    acc[i] = DOT(acc[i], q + d, k + i * row_stride + d);                       \
        }                                                                                      \
        _mm512_mask_storeu_ps(scores, (__mmask16)((1u << n) - 1),                              \
                              _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));               \
    }

SCORE_ROWS(score_rows_bf16, uint16_t, dot_bf16, 32)
SCORE_ROWS(score_rows_f32, float, dot_f32, 16)

/* Query heads weighed together over the values of their one KV head: each value row is read
 * (and, in bf16, interleaved) once for up to GROUP_MAX heads, whose sums stay in registers
 * over a block. */
#define GROUP_MAX 4
#define MAX_VECS (MAX_HEAD_DIM / 16)

/* GROUP_MAX heads' sums of MAX_VECS vectors each would not fit the 32 registers */
ALWAYS_INLINE int64_t heads_per_pass(const int64_t head_dim) {
    return head_dim * GROUP_MAX <= MAX_HEAD_DIM ? GROUP_MAX : MAX_HEAD_DIM / head_dim;
}

/* acc[j] += p_j(t) v_t + p_j(t + 1) v_{t+1} for the n <= GROUP_MAX heads whose bf16
 * probabilities start at pb[j * pb_stride]; only row t where it is the block's last
 * (`pair` false). The two rows are interleaved so that one VDPBF16PS adds both tokens'
 * products: each 32 dims come out in the order 0-3, 8-11, ... (lo) and 4-7, 12-15, ... (hi),
 * put back in order by finish_bf16. */
ALWAYS_INLINE void weigh_rows_bf16(__m512 acc[GROUP_MAX][MAX_VECS], const uint16_t *pb,
                                   int64_t pb_stride, int64_t n, int64_t t, const uint16_t *x,
                                   int64_t row_stride, int pair, const int64_t head_dim) {
    __m512bh xy[MAX_VECS];
    for (int64_t d = 0; d < head_dim; d += 32) {
        const __m512i a = _mm512_loadu_si512(x + d);
        const __m512i b = pair ? _mm512_loadu_si512(x + row_stride + d) : _mm512_setzero_si512();
        xy[d / 16] = (__m512bh)_mm512_unpacklo_epi16(a, b);
        xy[d / 16 + 1] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    _Pragma("GCC unroll 4") for (int64_t j = 0; j < GROUP_MAX; j++) {
        if (j >= n) break;
        uint32_t pp = pb[j * pb_stride + t];
        if (pair) memcpy(&pp, pb + j * pb_stride + t, sizeof pp);
        const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pp);
        for (int64_t v = 0; v < head_dim / 16; v++)
            acc[j][v] = _mm512_dpbf16_ps(acc[j][v], xy[v], pv);
    }
}

/* acc[j] += p_j(t) v_t for the n <= GROUP_MAX heads whose probabilities start at p[j * p_stride]. */
ALWAYS_INLINE void weigh_rows_f32(__m512 acc[GROUP_MAX][MAX_VECS], const float *p,
                                  int64_t p_stride, int64_t n, int64_t t, const float *x,
                                  int64_t row_stride, int pair, const int64_t head_dim) {
    (void)row_stride, (void)pair;
    __m512 row[MAX_VECS];
    for (int64_t v = 0; v < head_dim / 16; v++) row[v] = _mm512_loadu_ps(x + 16 * v);
    _Pragma("GCC unroll 4") for (int64_t j = 0; j < GROUP_MAX; j++) {
        if (j >= n) break;
        const __m512 pv = _mm512_set1_ps(p[j * p_stride + t]);
        for (int64_t v = 0; v < head_dim / 16; v++) acc[j][v] = _mm512_fmadd_ps(pv, row[v], acc[j][v]);
    }
}

/* The sums of n heads (n x head_dim floats from `sums` on) carried over one block's `rows`
 * value rows from v on, STEP rows at a time: in registers for the block, in memory between. */
#define WEIGH_BLOCK(NAME, T, P, ROWS, STEP)                                                    \
    ALWAYS_INLINE void NAME(float *sums, const P *p, int64_t p_stride, int64_t n, int64_t t0,  \
                            const T *v, int64_t rows, int64_t row_stride,                      \
                            const int64_t head_dim) {                                          \
        __m512 acc[GROUP_MAX][MAX_VECS];                                                       \
        for (int64_t j = 0; j < GROUP_MAX; j++)                                                \
            for (int64_t d = 0; d < head_dim / 16; d++)                                        \
                acc[j][d] = j < n ? _mm512_loadu_ps(sums + j * head_dim + 16 * d)              \
                                  : _mm512_setzero_ps();                                       \
        for (int64_t i = 0; i < rows; i += STEP)                                               \
            ROWS(acc, p, p_stride, n, t0 + i, v + i * row_stride, row_stride, i + 1 < rows,    \
                 head_dim);                                                                    \
        for (int64_t j = 0; j < n; j++)                                                        \
            for (int64_t d = 0; d < head_dim / 16; d++)                                        \
                _mm512_storeu_ps(sums + j * head_dim + 16 * d, acc[j][d]);                     \
    }

WEIGH_BLOCK(weigh_block_bf16, uint16_t, uint16_t, weigh_rows_bf16, 2)
WEIGH_BLOCK(weigh_block_f32, float, float, weigh_rows_f32, 1)

/* bf16: the probabilities (n rows of `stride` floats) rounded to bf16 in place, as the torch op
 * rounds them; rows of 2 x stride bf16. fp32 keeps them. */
ALWAYS_INLINE uint16_t *probabilities_bf16(float *p, int64_t stride, int64_t n, int64_t first,
                                           int64_t ctx) {
    uint16_t *pb = (uint16_t *)p;
    for (int64_t j = 0; j < n; j++)
        for (int64_t t = first; t < ctx; t += 16) {
            const __mmask16 m = ctx - t < 16 ? (__mmask16)((1u << (ctx - t)) - 1) : 0xFFFF;
            const __m256bh r = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, p + j * stride + t));
            _mm256_mask_storeu_epi16(pb + 2 * j * stride + t, m, (__m256i)r);
        }
    return pb;
}
ALWAYS_INLINE float *probabilities_f32(float *p, int64_t stride, int64_t n, int64_t first,
                                       int64_t ctx) {
    (void)stride, (void)n, (void)first, (void)ctx;
    return p;
}

/* out = the sums of n heads, in order (bf16's pairs interleaved them) and rounded. */
ALWAYS_INLINE void finish_bf16(const float *sums, int64_t n, const int64_t head_dim, uint16_t *out) {
    for (int64_t d = 0; d < n * head_dim; d += 32) {
        __m512 a, b;
        deinterleave(_mm512_loadu_ps(sums + d), _mm512_loadu_ps(sums + d + 16), &a, &b);
        _mm256_storeu_si256((__m256i *)(out + d), (__m256i)_mm512_cvtneps_pbh(a));
        _mm256_storeu_si256((__m256i *)(out + d + 16), (__m256i)_mm512_cvtneps_pbh(b));
    }
}
ALWAYS_INLINE void finish_f32(const float *sums, int64_t n, const int64_t head_dim, float *out) {
    memcpy(out, sums, (size_t)(n * head_dim) * sizeof(float));
}

/* One sequence, block by block: every query head's scores over a block's keys, then the
 * softmax, then every head's sums over a block's values, so that each block is read from DRAM
 * once per pass while the blocks ahead are on their way (prefetch_part: a piece of the block
 * ahead before each head's arithmetic), and again from L1 by the heads after the first.
 * Walking the context head by head instead re-read it from L2 and overlapped none of the reads
 * with arithmetic: 1.7x slower from DRAM (RESULTS.md, 2026-12-07 third session). `scores`
 * holds q_heads x ctx floats, `sums` q_heads x head_dim. */
#define ATTEND_SEQ_AVX512(NAME, T, P, SCORE, PROBABILITIES, WEIGH, FINISH)                     \
    ALWAYS_INLINE void NAME(const T *q, const T *k_cache, const T *v_cache,                    \
                            int64_t block_stride, const int64_t *table, int64_t ctx,          \
                            int64_t q_heads, int64_t kv_heads, const int64_t head_dim,         \
                            int64_t block_size, float scale, int64_t first, float softcap,     \
                            float *scores, float *sums, T *out) {                              \
        const int64_t group = q_heads / kv_heads, row_stride = kv_heads * head_dim;           \
        const int64_t block_bytes = block_size * row_stride * (int64_t)sizeof(T);             \
        const int64_t stride_bytes = block_stride * (int64_t)sizeof(T);                        \
        const int64_t nblocks = (ctx + block_size - 1) / block_size, b0 = first / block_size;  \
        for (int64_t b = b0; b < nblocks; b++) {                                               \
            const int64_t t0 = b * block_size, n = ctx - t0 < block_size ? ctx - t0 : block_size; \
            const T *kb = k_cache + table[b] * block_stride;                                   \
            for (int64_t i0 = b == b0 ? first - t0 : 0; i0 < n; i0 += 16)                      \
                for (int64_t j = 0; j < q_heads; j++)                                          \
                    prefetch_part(k_cache, stride_bytes, table, b0, b, nblocks, block_bytes,   \
                                  j + q_heads * (i0 / 16), q_heads * ((n + 15) / 16)),        \
                    SCORE(q + j * head_dim, kb + i0 * row_stride + j / group * head_dim,       \
                          row_stride, n - i0 < 16 ? n - i0 : 16, head_dim, scale,              \
                          scores + j * ctx + t0 + i0);                                         \
        }                                                                                      \
        for (int64_t j = 0; j < q_heads; j++) {                                                \
            soft_cap(scores + j * ctx + first, ctx - first, softcap);                          \
            softmax(scores + j * ctx + first, ctx - first);                                    \
        }                                                                                      \
        const P *p = PROBABILITIES(scores, ctx, q_heads, first, ctx);                          \
        const int64_t p_stride = ctx * (int64_t)(sizeof(float) / sizeof(P));                   \
        const int64_t per_pass = heads_per_pass(head_dim);                                     \
        const int64_t passes = (group + per_pass - 1) / per_pass; /* per KV head */            \
        memset(sums, 0, (size_t)(q_heads * head_dim) * sizeof(float));                        \
        for (int64_t b = b0; b < nblocks; b++) {                                               \
            const int64_t t0 = b * block_size, n = ctx - t0 < block_size ? ctx - t0 : block_size; \
            const int64_t s = b == b0 ? first - t0 : 0; /* the rows the window sees */        \
            const T *vb = v_cache + table[b] * block_stride + s * row_stride;                  \
            for (int64_t h = 0; h < kv_heads; h++)                                             \
                for (int64_t j = h * group; j < (h + 1) * group; j += per_pass)                \
                    prefetch_part(v_cache, stride_bytes, table, b0, b, nblocks, block_bytes,   \
                                  h * passes + (j - h * group) / per_pass, kv_heads * passes), \
                    WEIGH(sums + j * head_dim, p + j * p_stride, p_stride,                     \
                          (h + 1) * group - j < per_pass ? (h + 1) * group - j : per_pass,     \
                          t0 + s, vb + h * head_dim, n - s, row_stride, head_dim);             \
        }                                                                                      \
        FINISH(sums, q_heads, head_dim, out);                                                  \
    }

ATTEND_SEQ_AVX512(attend_avx512_bf16, uint16_t, uint16_t, score_rows_bf16, probabilities_bf16,
                  weigh_block_bf16, finish_bf16)
ATTEND_SEQ_AVX512(attend_avx512_f32, float, float, score_rows_f32, probabilities_f32,
                  weigh_block_f32, finish_f32)
#endif

#ifdef HAVE_AVX512
#define FAST_SEQ(FAST, ...) FAST(__VA_ARGS__)
#else /* never called: head_dim decides, and FAST_DIM is 0 */
#define FAST_SEQ(FAST, ...)
#endif
#ifdef HAVE_AVX512
#define FAST_DIM(head_dim) ((head_dim) % 32 == 0)
#else
#define FAST_DIM(head_dim) 0
#endif

/* The batch's sequences are shared out over the OpenMP threads (torch's own pool: the library
 * links the libgomp torch has loaded), whole sequences each. */
#define PAGED_DECODE(NAME, SEQ, FAST, T, LOAD, STORE)                                          \
    ATTEND_SEQ(SEQ, T, LOAD, STORE)                                                            \
    int NAME(const T *q, const T *k_cache, const T *v_cache, int64_t block_stride,             \
             const int64_t *tables, int64_t table_stride, const int64_t *ctx_lens,             \
             int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim,               \
             int64_t block_size, float scale, int64_t window, float softcap, T *out) {         \
        if (head_dim > MAX_HEAD_DIM || q_heads % kv_heads) return -1;                          \
        int64_t max_ctx = 1;                                                                   \
        for (int64_t b = 0; b < batch; b++) max_ctx = ctx_lens[b] > max_ctx ? ctx_lens[b] : max_ctx; \
        int failed = 0;                                                                        \
        _Pragma("omp parallel for schedule(dynamic)")                                          \
        for (int64_t b = 0; b < batch; b++) {                                                  \
            float *scores = scratch(q_heads * (max_ctx + 2 * head_dim + 1));                  \
            if (scores == NULL) {                                                              \
                _Pragma("omp atomic write") failed = 1;                                        \
                continue;                                                                      \
            }                                                                                  \
            float *qf = scores + q_heads * max_ctx, *acc = qf + q_heads * head_dim;           \
            float *inv = acc + q_heads * head_dim;                                             \
            const int64_t *table = tables + b * table_stride, ctx = ctx_lens[b];              \
            const int64_t first = first_seen(ctx, window);                                     \
            const T *qb = q + b * q_heads * head_dim;                                          \
            T *ob = out + b * q_heads * head_dim;                                              \
            if (FAST_DIM(head_dim) && head_dim == 64)                                          \
                FAST_SEQ(FAST, qb, k_cache, v_cache, block_stride, table, ctx, q_heads,        \
                         kv_heads, 64, block_size, scale, first, softcap, scores, acc,         \
                         ob);                                                                  \
            else if (FAST_DIM(head_dim) && head_dim == 128)                                    \
                FAST_SEQ(FAST, qb, k_cache, v_cache, block_stride, table, ctx, q_heads,        \
                         kv_heads, 128, block_size, scale, first, softcap, scores, acc,        \
                         ob);                                                                  \
            else if (FAST_DIM(head_dim))                                                       \
                FAST_SEQ(FAST, qb, k_cache, v_cache, block_stride, table, ctx, q_heads,        \
                         kv_heads, head_dim, block_size, scale, first, softcap, scores, acc,   \
                         ob);                                                                  \
            else                                                                               \
                SEQ(qb, k_cache, v_cache, block_stride, table, ctx, q_heads, kv_heads,         \
                    head_dim, block_size, scale, first, softcap, scores, qf, acc, inv, ob);    \
        }                                                                                      \
        return failed ? -1 : 0;                                                                \
    }

PAGED_DECODE(paged_decode_bf16, attend_seq_bf16, attend_avx512_bf16, uint16_t, from_bf16, to_bf16)
PAGED_DECODE(paged_decode_f32, attend_seq_f32, attend_avx512_f32, float, from_f32, to_f32)
