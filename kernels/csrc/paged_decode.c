/* Paged decode attention on a CPU: one query token per sequence against its cached context,
 * read block by block where it lies (no gather, no padding to the longest sequence).
 *
 * Cache element (block b, slot t, KV head h, dim d) sits at
 *   cache[b * block_stride + (t * kv_heads + h) * head_dim + d]
 * (baton/cache/kv_cache.py: one layer's K or V view). A sequence's blocks are walked once for
 * the keys and once for the values, each slot's row (every KV head) read in order, so a block
 * is one contiguous read; each head's part of the row is widened once and scored against the
 * query heads that share it. Scores, softmax and the weighted sum are fp32; bf16 is widened
 * on load and rounded once on store.
 * Built by kernels/native.py with -O3 -march=native -ffast-math, which vectorizes the loops
 * over head_dim and the context (expf included, through glibc's vector math).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float from_bf16(uint16_t x) {
    union { uint32_t u; float f; } v = {(uint32_t)x << 16};
    return v.f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

static inline float from_f32(float x) { return x; }
static inline float to_f32(float x) { return x; }

#define MAX_HEAD_DIM 256

/* Blocks lie anywhere in the pool, so the hardware prefetcher stops at each one: ask for the
 * next block while this one is being read (in the engine the KV comes from DRAM). */
static inline void prefetch(const void *first, int64_t nbytes) {
    for (int64_t off = 0; off < nbytes; off += 64) __builtin_prefetch((const char *)first + off, 0, 3);
}

/* Scratch for one call, per thread, grown as needed and kept: no allocation per call. */
static float *scratch(int64_t nfloats) {
    static __thread float *buf = NULL;
    static __thread int64_t cap = 0;
    if (nfloats > cap) {
        float *grown = realloc(buf, (size_t)nfloats * sizeof(float));
        if (grown == NULL) return NULL;
        buf = grown;
        cap = nfloats;
    }
    return buf;
}

/* One sequence: every query head against its `ctx` cached tokens. `scores` is [q_heads][ctx],
 * `qf` and `acc` [q_heads][head_dim], `inv` [q_heads]. Called with a constant head_dim where
 * it is a common one, so the compiler unrolls the row loops into whole vectors. */
#define ATTEND_SEQ(NAME, T, LOAD, STORE)                                                       \
    static inline __attribute__((always_inline)) void NAME(                                    \
        const T *q, const T *k_cache, const T *v_cache, int64_t block_stride,                  \
        const int64_t *table, int64_t ctx, int64_t q_heads, int64_t kv_heads,                  \
        const int64_t head_dim, int64_t block_size, float scale, float *scores, float *qf,     \
        float *acc, float *inv, T *out) {                                                      \
        const int64_t group = q_heads / kv_heads, row_stride = kv_heads * head_dim;           \
        const int64_t block_bytes = block_size * row_stride * (int64_t)sizeof(T);             \
        float row[MAX_HEAD_DIM];                                                               \
        for (int64_t i = 0; i < q_heads * head_dim; i++) qf[i] = LOAD(q[i]) * scale;         \
        for (int64_t t0 = 0; t0 < ctx; t0 += block_size) { /* scores[j][t] = q_j . k_t */      \
            const T *kp = k_cache + table[t0 / block_size] * block_stride;                    \
            const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;                  \
            if (t0 + block_size < ctx)                                                         \
                prefetch(k_cache + table[t0 / block_size + 1] * block_stride, block_bytes);    \
            for (int64_t i = 0; i < n; i++, kp += row_stride) {                                \
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
        for (int64_t j = 0; j < q_heads; j++) { /* softmax over the context */                 \
            float *s = scores + j * ctx, m = -INFINITY, sum = 0.f;                             \
            for (int64_t t = 0; t < ctx; t++) m = s[t] > m ? s[t] : m;                         \
            for (int64_t t = 0; t < ctx; t++) {                                                \
                s[t] = expf(s[t] - m);                                                         \
                sum += s[t];                                                                   \
            }                                                                                  \
            inv[j] = 1.f / sum;                                                                \
        }                                                                                      \
        for (int64_t i = 0; i < q_heads * head_dim; i++) acc[i] = 0.f;                        \
        for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {                                    \
            const T *vp = v_cache + table[t0 / block_size] * block_stride;                    \
            const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;                  \
            if (t0 + block_size < ctx)                                                         \
                prefetch(v_cache + table[t0 / block_size + 1] * block_stride, block_bytes);    \
            for (int64_t i = 0; i < n; i++, vp += row_stride) {                                \
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

#define PAGED_DECODE(NAME, SEQ, T, LOAD, STORE)                                                \
    ATTEND_SEQ(SEQ, T, LOAD, STORE)                                                            \
    int NAME(const T *q, const T *k_cache, const T *v_cache, int64_t block_stride,             \
             const int64_t *tables, int64_t table_stride, const int64_t *ctx_lens,             \
             int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim,               \
             int64_t block_size, float scale, T *out) {                                        \
        if (head_dim > MAX_HEAD_DIM || q_heads % kv_heads) return -1;                          \
        int64_t max_ctx = 1;                                                                   \
        for (int64_t b = 0; b < batch; b++) max_ctx = ctx_lens[b] > max_ctx ? ctx_lens[b] : max_ctx; \
        float *scores = scratch(q_heads * (max_ctx + 2 * head_dim + 1));                      \
        if (scores == NULL) return -1;                                                         \
        float *qf = scores + q_heads * max_ctx, *acc = qf + q_heads * head_dim;               \
        float *inv = acc + q_heads * head_dim;                                                 \
        for (int64_t b = 0; b < batch; b++) {                                                  \
            const int64_t *table = tables + b * table_stride, ctx = ctx_lens[b];              \
            const T *qb = q + b * q_heads * head_dim;                                          \
            T *ob = out + b * q_heads * head_dim;                                              \
            if (head_dim == 64)                                                                \
                SEQ(qb, k_cache, v_cache, block_stride, table, ctx, q_heads, kv_heads, 64,     \
                    block_size, scale, scores, qf, acc, inv, ob);                              \
            else if (head_dim == 128)                                                          \
                SEQ(qb, k_cache, v_cache, block_stride, table, ctx, q_heads, kv_heads, 128,    \
                    block_size, scale, scores, qf, acc, inv, ob);                              \
            else                                                                               \
                SEQ(qb, k_cache, v_cache, block_stride, table, ctx, q_heads, kv_heads,         \
                    head_dim, block_size, scale, scores, qf, acc, inv, ob);                    \
        }                                                                                      \
        return 0;                                                                              \
    }

PAGED_DECODE(paged_decode_bf16, attend_seq_bf16, uint16_t, from_bf16, to_bf16)
PAGED_DECODE(paged_decode_f32, attend_seq_f32, float, from_f32, to_f32)
