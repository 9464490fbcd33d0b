/* Rotary embedding (rotate-half) of q and k, out of place; kernels/rotary.py is the reference
 * and the result is bit for bit its own: x * cos and rotate_half(x) * sin each rounded to the
 * dtype, then their sum. That needs every product rounded on its own, so no fused
 * multiply-add here, whatever -ffast-math allows elsewhere. */
#pragma GCC optimize("fp-contract=off")
#include "common.h"

/* One tensor's heads: x[t] is a row of `heads` x head_dim at x_stride (a view into the fused
 * qkv projection), out[t] the same, contiguous. cos/sin: [max_position][head_dim]. */
#define ROTATE(NAME, T, LOAD, STORE)                                                           \
    static void NAME(const T *x, int64_t x_stride, int64_t heads, int64_t head_dim,            \
                     const int64_t *positions, const T *cos, const T *sin, int64_t tokens,     \
                     T *out) {                                                                 \
        const int64_t half = head_dim / 2;                                                     \
        _Pragma("omp parallel for if (tokens * heads * head_dim >= PARALLEL_MIN_ELEMENTS)")    \
        for (int64_t t = 0; t < tokens; t++) {                                                 \
            const T *c = cos + positions[t] * head_dim, *s = sin + positions[t] * head_dim;    \
            for (int64_t h = 0; h < heads; h++) {                                              \
                const T *xh = x + t * x_stride + h * head_dim;                                 \
                T *o = out + (t * heads + h) * head_dim;                                       \
                for (int64_t i = 0; i < half; i++) {                                           \
                    const float a = LOAD(STORE(LOAD(xh[i]) * LOAD(c[i])));                    \
                    const float b = LOAD(STORE(-LOAD(xh[half + i]) * LOAD(s[i])));            \
                    o[i] = STORE(a + b);                                                       \
                }                                                                              \
                for (int64_t i = half; i < head_dim; i++) {                                    \
                    const float a = LOAD(STORE(LOAD(xh[i]) * LOAD(c[i])));                    \
                    const float b = LOAD(STORE(LOAD(xh[i - half]) * LOAD(s[i])));             \
                    o[i] = STORE(a + b);                                                       \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

#define APPLY_ROTARY(NAME, ROT, T, LOAD, STORE)                                                \
    ROTATE(ROT, T, LOAD, STORE)                                                                \
    int NAME(const T *q, int64_t q_stride, int64_t q_heads, const T *k, int64_t k_stride,      \
             int64_t k_heads, int64_t head_dim, const int64_t *positions, const T *cos,         \
             const T *sin, int64_t tokens, T *q_out, T *k_out) {                               \
        ROT(q, q_stride, q_heads, head_dim, positions, cos, sin, tokens, q_out);              \
        ROT(k, k_stride, k_heads, head_dim, positions, cos, sin, tokens, k_out);              \
        return 0;                                                                              \
    }

APPLY_ROTARY(apply_rotary_bf16, rotate_bf16, uint16_t, from_bf16, to_bf16)
APPLY_ROTARY(apply_rotary_f32, rotate_f32, float, from_f32, to_f32)
