/* Paged decode attention on a CPU: one query token per sequence against its cached context,
 * read block by block where it lies (no gather, no padding to the longest sequence).
 *
 * Cache element (block b, slot t, KV head h, dim d) sits at
 *   cache[b * block_stride + (t * kv_heads + h) * head_dim + d]
 * (baton/cache/kv_cache.py: one layer's K or V view). Per sequence and KV head, the `group`
 * query heads that share it are scored together, so each key and value is read once. Scores,
 * softmax and the weighted sum are fp32; bf16 is widened on load and rounded once on store.
 * Built by kernels/native.py with -O3 -march=native -ffast-math, which vectorizes the loops
 * over head_dim and the context (expf included, through glibc's vector math).
 */
#include <math.h>
#include <stdint.h>

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

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

/* Blocks lie anywhere in the pool, so the hardware prefetcher stops at each one: ask for the
 * next block's rows while this one is being read (in the engine the KV comes from DRAM). */
static inline void prefetch_rows(const void *first, int64_t rows, int64_t stride_bytes,
                                 int64_t row_bytes) {
    const char *p = first;
    for (int64_t r = 0; r < rows; r++, p += stride_bytes)
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

/* One sequence and one KV head: the `group` query heads that share it, against `ctx` cached
 * tokens. Walked block by block (no division per token); each key and value row is widened
 * to fp32 once and used by every query head of the group. Called with a constant head_dim
 * where it is a common one, so the compiler unrolls the row loops into whole vectors. */
#define ATTEND_ONE(NAME, T, LOAD, STORE)                                                       \
    static inline __attribute__((always_inline)) void NAME(                                    \
        const T *q, const T *k_base, const T *v_base, int64_t block_stride, int64_t row_stride, \
        const int64_t *table, int64_t ctx, int64_t group, const int64_t head_dim,               \
        int64_t block_size, float scale, float *scores, T *out) {                              \
        float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM];   \
        float inv[MAX_GROUP];                                                                  \
        for (int64_t j = 0; j < group; j++)                                                    \
            for (int64_t d = 0; d < head_dim; d++) qf[j][d] = LOAD(q[j * head_dim + d]) * scale; \
        for (int64_t t0 = 0; t0 < ctx; t0 += block_size) { /* scores[j * ctx + t] = q_j . k_t */ \
            const T *kp = k_base + table[t0 / block_size] * block_stride;                     \
            const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;                  \
            if (t0 + block_size < ctx)                                                         \
                prefetch_rows(k_base + table[t0 / block_size + 1] * block_stride, block_size,  \
                              row_stride * sizeof(T), head_dim * sizeof(T));                   \
            for (int64_t i = 0; i < n; i++, kp += row_stride) {                                \
                for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(kp[d]);                   \
                for (int64_t j = 0; j < group; j++) {                                          \
                    float s = 0.f;                                                             \
                    for (int64_t d = 0; d < head_dim; d++) s += qf[j][d] * row[d];             \
                    scores[j * ctx + t0 + i] = s;                                              \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int64_t j = 0; j < group; j++) { /* softmax over the context */                   \
            float *s = scores + j * ctx, m = -INFINITY, sum = 0.f;                             \
            for (int64_t t = 0; t < ctx; t++) m = s[t] > m ? s[t] : m;                         \
            for (int64_t t = 0; t < ctx; t++) {                                                \
                s[t] = expf(s[t] - m);                                                         \
                sum += s[t];                                                                   \
            }                                                                                  \
            inv[j] = 1.f / sum;                                                                \
            for (int64_t d = 0; d < head_dim; d++) acc[j][d] = 0.f;                            \
        }                                                                                      \
        for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {                                    \
            const T *vp = v_base + table[t0 / block_size] * block_stride;                     \
            const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;                  \
            if (t0 + block_size < ctx)                                                         \
                prefetch_rows(v_base + table[t0 / block_size + 1] * block_stride, block_size,  \
                              row_stride * sizeof(T), head_dim * sizeof(T));                   \
            for (int64_t i = 0; i < n; i++, vp += row_stride) {                                \
                for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(vp[d]);                   \
                for (int64_t j = 0; j < group; j++) {                                          \
                    const float p = scores[j * ctx + t0 + i];                                  \
                    for (int64_t d = 0; d < head_dim; d++) acc[j][d] += p * row[d];            \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int64_t j = 0; j < group; j++)                                                    \
            for (int64_t d = 0; d < head_dim; d++)                                             \
                out[j * head_dim + d] = STORE(acc[j][d] * inv[j]);                             \
    }

#define PAGED_DECODE(NAME, ONE, T, LOAD, STORE)                                                \
    ATTEND_ONE(ONE, T, LOAD, STORE)                                                            \
    int NAME(const T *q, const T *k_cache, const T *v_cache, int64_t block_stride,             \
             const int64_t *tables, int64_t table_stride, const int64_t *ctx_lens,             \
             int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim,               \
             int64_t block_size, float scale, float *scores, T *out) {                         \
        const int64_t group = q_heads / kv_heads, row_stride = kv_heads * head_dim;           \
        if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM) return -1;                           \
        for (int64_t b = 0; b < batch; b++) {                                                  \
            for (int64_t h = 0; h < kv_heads; h++) {                                           \
                const int64_t first = (b * q_heads + h * group) * head_dim;                   \
                const T *kb = k_cache + h * head_dim, *vb = v_cache + h * head_dim;           \
                const int64_t *table = tables + b * table_stride, ctx = ctx_lens[b];          \
                if (head_dim == 64)                                                            \
                    ONE(q + first, kb, vb, block_stride, row_stride, table, ctx, group, 64,    \
                        block_size, scale, scores, out + first);                               \
                else if (head_dim == 128)                                                      \
                    ONE(q + first, kb, vb, block_stride, row_stride, table, ctx, group, 128,   \
                        block_size, scale, scores, out + first);                               \
                else                                                                           \
                    ONE(q + first, kb, vb, block_stride, row_stride, table, ctx, group,        \
                        head_dim, block_size, scale, scores, out + first);                     \
            }                                                                                  \
        }                                                                                      \
        return 0;                                                                              \
    }

PAGED_DECODE(paged_decode_bf16, attend_one_bf16, uint16_t, from_bf16, to_bf16)
PAGED_DECODE(paged_decode_f32, attend_one_f32, float, from_f32, to_f32)
