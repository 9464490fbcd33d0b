/* bf16 linear layer (y = x W^T + b) for a CPU with AVX-512 BF16: every projection of a bf16
 * model, prefill and decode alike (int8 weights: linear_i8.c). At decode's few rows oneDNN
 * spends a large part of each call outside the multiply (1.2-4x this kernel's time at 1-64
 * rows, RESULTS.md); at prefill's hundreds it is level. With AMX, oneDNN's bf16 tiles are far
 * ahead: there linear_bf16_pack refuses and the model keeps oneDNN (baton/model/llama.py).
 *
 * The weight is packed once, [n / 16][k / 2][16][2]: for each 16 output columns, each pair of
 * inputs k, k + 1 of those columns as one vector of 32 values, the operand VDPBF16PS multiplies
 * with a broadcast pair of x. A tile of up to 8 rows x 48 columns keeps 24 fp32 sums in
 * registers over the whole of k, so each output is summed in one fixed order, whatever the
 * number of rows and whichever tile holds its row: a row's output does not depend on the batch
 * it came in. Products are exact in fp32 (VDPBF16PS treats bf16 subnormals as zero); the sum
 * plus the bias is rounded to bf16 once, on store. Columns are shared out over OpenMP threads,
 * 48 at a time. */
#include <stddef.h>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "linear.h"

#define ROWS 8 /* rows of a tile: 8 x 3 sums, 3 weight vectors and a broadcast in 32 registers */

int linear_bf16_pack(const uint16_t *w, int64_t n, int64_t k, uint16_t *packed) {
#ifdef __AMX_BF16__
    (void)w, (void)n, (void)k, (void)packed;
    return -1; /* oneDNN's AMX tiles serve bf16 */
#else
    if (k % 2) return -1;
    const int64_t pairs = k / 2, blocks = (n + COLS - 1) / COLS;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t c = 0; c < COLS; c++) { /* columns past n are zeros, never stored */
                const int64_t col = b * COLS + c;
                uint16_t *o = packed + ((b * pairs + p) * COLS + c) * 2;
                o[0] = col < n ? w[col * k + 2 * p] : 0;
                o[1] = col < n ? w[col * k + 2 * p + 1] : 0;
            }
    return 0;
#endif
}

/* rows x vecs outputs of one tile, `rows` and `vecs` constants where it is called. `next`,
 * where given, is the weight of the next tile of columns, fetched into L2 during this one. */
ALWAYS_INLINE void tile(const uint16_t *x, int64_t k, const int rows, const uint16_t *w,
                        const int vecs, const uint16_t *next, const uint16_t *bias, uint16_t *y,
                        int64_t n, int64_t cols_left) {
    const int64_t pairs = k / 2, block = pairs * COLS * 2;
    const uint32_t *xp = (const uint32_t *)x; /* a pair of bf16 inputs as one 32-bit lane */
    __m512 acc[ROWS][VECS];
#pragma GCC unroll 8
    for (int i = 0; i < rows; i++)
#pragma GCC unroll 3
        for (int j = 0; j < vecs; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh b[VECS];
#pragma GCC unroll 3
        for (int j = 0; j < vecs; j++)
            b[j] = (__m512bh)_mm512_loadu_si512(w + j * block + p * COLS * 2);
        if (next != NULL) /* a pair of 16 columns is one 64-byte line */
            for (int j = 0; j < vecs; j++)
                _mm_prefetch((const char *)(next + j * block + p * COLS * 2), _MM_HINT_T1);
#pragma GCC unroll 8
        for (int i = 0; i < rows; i++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)xp[i * pairs + p]);
#pragma GCC unroll 3
            for (int j = 0; j < vecs; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
        }
    }
    for (int j = 0; j < vecs; j++) {
        const __mmask16 mask = column_mask(cols_left - j * COLS);
        const __m512 b = bias_f32(bias == NULL ? NULL : bias + j * COLS, mask);
        for (int i = 0; i < rows; i++) {
            const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[i][j], b));
            _mm256_mask_storeu_epi16(y + i * n + j * COLS, mask, (__m256i)out);
        }
    }
}

#define TILE(R, V) tile(x, k, R, w, V, next, bias, y, n, cols_left)
/* Full-width tiles get a constant row count so that their sums stay in registers. */
ALWAYS_INLINE void any_tile(const uint16_t *x, int64_t k, int rows, const uint16_t *w, int vecs,
                            const uint16_t *next, const uint16_t *bias, uint16_t *y, int64_t n,
                            int64_t cols_left) {
    if (vecs < VECS) {
        TILE(rows, vecs);
        return;
    }
    switch (rows) {
    case 8: TILE(8, VECS); break;
    case 7: TILE(7, VECS); break;
    case 6: TILE(6, VECS); break;
    case 5: TILE(5, VECS); break;
    case 4: TILE(4, VECS); break;
    case 3: TILE(3, VECS); break;
    case 2: TILE(2, VECS); break;
    default: TILE(1, VECS); break;
    }
}
#undef TILE

int linear_bf16(const uint16_t *x, int64_t m, int64_t k, const uint16_t *packed, int64_t n,
                const uint16_t *bias, uint16_t *y) {
    if (k % 2) return -1;
    const int64_t blocks = (n + COLS - 1) / COLS, strips = (blocks + VECS - 1) / VECS;
    const int64_t strip_size = VECS * k * COLS; /* a strip: 48 columns of the weight */
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < strips; s++) {
        const int vecs = (int)(blocks - s * VECS < VECS ? blocks - s * VECS : VECS);
        const int64_t col = s * VECS * COLS;
        const uint16_t *w = packed + s * strip_size;
        for (int64_t r = 0; r < m; r += ROWS) {
            /* with more than one tile of rows the multiply outlasts the fetch from DRAM: the
             * first tile brings the next strip in meanwhile (alone, it would only compete) */
            const uint16_t *next = r == 0 && s + 2 < strips ? w + strip_size : NULL;
            any_tile(x + r * k, k, (int)(m - r < ROWS ? m - r : ROWS), w, vecs, next,
                     bias == NULL ? NULL : bias + col, y + r * n + col, n, n - col);
        }
    }
    return 0;
}

#else /* torch serves: without AVX-512 BF16, oneDNN is as good as anything here */
int linear_bf16_pack(const uint16_t *w, int64_t n, int64_t k, uint16_t *packed) {
    (void)w, (void)n, (void)k, (void)packed;
    return -1;
}

int linear_bf16(const uint16_t *x, int64_t m, int64_t k, const uint16_t *packed, int64_t n,
                const uint16_t *bias, uint16_t *y) {
    (void)x, (void)m, (void)k, (void)packed, (void)n, (void)bias, (void)y;
    return -1;
}
#endif
