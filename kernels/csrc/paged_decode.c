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

#define PAGED_DECODE(NAME, T, LOAD, STORE)                                                     \
    int NAME(const T *q, const T *k_cache, const T *v_cache, int64_t block_stride,             \
             const int64_t *tables, int64_t table_stride, const int64_t *ctx_lens,             \
             int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim,               \
             int64_t block_size, float scale, float *scores, T *out) {                         \
        const int64_t group = q_heads / kv_heads;                                             \
        if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM) return -1;                           \
        float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], inv[MAX_GROUP];     \
        for (int64_t b = 0; b < batch; b++) {                                                  \
            const int64_t ctx = ctx_lens[b];                                                   \
            const int64_t *table = tables + b * table_stride;                                  \
            for (int64_t h = 0; h < kv_heads; h++) {                                           \
                for (int64_t j = 0; j < group; j++) {                                          \
                    const T *qp = q + (b * q_heads + h * group + j) * head_dim;                \
                    for (int64_t d = 0; d < head_dim; d++) qf[j][d] = LOAD(qp[d]) * scale;     \
                }                                                                              \
                for (int64_t t = 0; t < ctx; t++) { /* scores[j * ctx + t] = q_j . k_t */      \
                    const T *kp = k_cache + table[t / block_size] * block_stride +             \
                                  ((t % block_size) * kv_heads + h) * head_dim;                \
                    for (int64_t j = 0; j < group; j++) {                                      \
                        float s = 0.f;                                                         \
                        for (int64_t d = 0; d < head_dim; d++) s += qf[j][d] * LOAD(kp[d]);   \
                        scores[j * ctx + t] = s;                                               \
                    }                                                                          \
                }                                                                              \
                for (int64_t j = 0; j < group; j++) { /* softmax over the context */           \
                    float *s = scores + j * ctx, m = -INFINITY, sum = 0.f;                     \
                    for (int64_t t = 0; t < ctx; t++) m = s[t] > m ? s[t] : m;                 \
                    for (int64_t t = 0; t < ctx; t++) {                                        \
                        s[t] = expf(s[t] - m);                                                 \
                        sum += s[t];                                                           \
                    }                                                                          \
                    inv[j] = 1.f / sum;                                                        \
                    for (int64_t d = 0; d < head_dim; d++) acc[j][d] = 0.f;                    \
                }                                                                              \
                for (int64_t t = 0; t < ctx; t++) {                                            \
                    const T *vp = v_cache + table[t / block_size] * block_stride +             \
                                  ((t % block_size) * kv_heads + h) * head_dim;                \
                    for (int64_t j = 0; j < group; j++) {                                      \
                        const float p = scores[j * ctx + t];                                   \
                        for (int64_t d = 0; d < head_dim; d++) acc[j][d] += p * LOAD(vp[d]);  \
                    }                                                                          \
                }                                                                              \
                for (int64_t j = 0; j < group; j++) {                                          \
                    T *op = out + (b * q_heads + h * group + j) * head_dim;                    \
                    for (int64_t d = 0; d < head_dim; d++) op[d] = STORE(acc[j][d] * inv[j]);  \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        return 0;                                                                              \
    }

PAGED_DECODE(paged_decode_bf16, uint16_t, from_bf16, to_bf16)
PAGED_DECODE(paged_decode_f32, float, from_f32, to_f32)
