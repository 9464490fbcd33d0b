/* Scatter each new token's keys and values into its slot of the paged cache, any dtype (rows
 * are copied as bytes); kernels/kv_write.py is the reference. One call for K and V of a layer,
 * where torch's indexed assignment costs ~7 us a call before it copies anything. */
#include <math.h>
#include <string.h>

#include "common.h"

int write_kv(char *k_cache, char *v_cache, int64_t block_bytes, int64_t num_blocks,
             int64_t block_size, const char *k, int64_t k_stride, const char *v, int64_t v_stride,
             int64_t row_bytes, const int64_t *blocks, const int64_t *offsets, int64_t tokens) {
    for (int64_t t = 0; t < tokens; t++) /* out of the pool: refuse before writing anything */
        if (blocks[t] < 0 || blocks[t] >= num_blocks || offsets[t] < 0 || offsets[t] >= block_size)
            return -1;
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t at = blocks[t] * block_bytes + offsets[t] * row_bytes;
        memcpy(k_cache + at, k + t * k_stride, (size_t)row_bytes);
        memcpy(v_cache + at, v + t * v_stride, (size_t)row_bytes);
    }
    return 0;
}

/* The 8-bit cache (kernels/kv_int8.py is the reference): each bf16 row (token, KV head) of
 * keys and values is stored as int8, rounded to nearest, with its fp32 scale amax / 127.
 * Strides are in elements of their own arrays. */
static void quantize_row(const uint16_t *x, int64_t n, int8_t *q, float *scale) {
    float amax = 0.f;
    for (int64_t d = 0; d < n; d++) {
        const float a = from_bf16(x[d]);
        amax = a > amax ? a : (-a > amax ? -a : amax);
    }
    const float s = (amax > 1e-8f ? amax : 1e-8f) / 127.f;
    for (int64_t d = 0; d < n; d++) q[d] = (int8_t)nearbyintf(from_bf16(x[d]) / s);
    *scale = s;
}

int write_kv_i8_bf16(int8_t *k_cache, int8_t *v_cache, float *k_scale, float *v_scale,
                     int64_t block_stride, int64_t scale_block_stride, int64_t num_blocks,
                     int64_t block_size, const uint16_t *k, int64_t k_stride, const uint16_t *v,
                     int64_t v_stride, int64_t kv_heads, int64_t head_dim, const int64_t *blocks,
                     const int64_t *offsets, int64_t tokens) {
    for (int64_t t = 0; t < tokens; t++)
        if (blocks[t] < 0 || blocks[t] >= num_blocks || offsets[t] < 0 || offsets[t] >= block_size)
            return -1;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t row = offsets[t] * kv_heads + h;
            const int64_t at = blocks[t] * block_stride + row * head_dim;
            const int64_t s_at = blocks[t] * scale_block_stride + row;
            quantize_row(k + t * k_stride + h * head_dim, head_dim, k_cache + at, k_scale + s_at);
            quantize_row(v + t * v_stride + h * head_dim, head_dim, v_cache + at, v_scale + s_at);
        }
    return 0;
}
