/* Scatter each new token's keys and values into its slot of the paged cache, any dtype (rows
 * are copied as bytes); kernels/kv_write.py is the reference. One call for K and V of a layer,
 * where torch's indexed assignment costs ~7 us a call before it copies anything. */
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
