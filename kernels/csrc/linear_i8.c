/* int8 linear layer (y = x W^T + b, `--quantization int8`) on AVX-512 VNNI: the weight in int8
 * with an fp16 scale per block of 32 inputs of each output column (llama.cpp's Q8_0, so a Q8_0
 * GGUF's weights serve as they are), the activations quantized to int8 as each call begins, in
 * the same blocks with an fp32 scale each, so that the products run as VPDPBUSD: 64
 * multiply-adds an instruction, exact in int32. Widening int8 weights to bf16 instead (this
 * kernel's first form) cost 6 instructions per 32 weights, which made batch-1 decode bound by
 * arithmetic, not by the weight's bytes; now a block of 32 inputs costs 8 VPDPBUSD per 16
 * columns, then one conversion, one multiply (the two scales) and one multiply-add into the
 * fp32 sum.
 *
 * VPDPBUSD multiplies unsigned bytes by signed ones: the weight is stored as q + 128 (1..255)
 * and each block's sum is corrected by 128 x the sum of its int8 activations, in int32, so
 * every block's dot product is exact. y = sum over blocks (w_scale[c][b] x_scale[b] dot[b]),
 * plus the bias, rounded to bf16 once. A row's activations are quantized on their own and its
 * sums run in one fixed order, so a row's output does not depend on its batch.
 *
 * The weight is packed once, [n / 16][kpad / 4][16][4] (kpad: k rounded up to 32, the padding
 * a weight of 0 against an activation of 0): for each 16 output columns, each 4 inputs of those
 * columns as one 64-byte vector; its scales [n / 16][kpad / 32][16] (linear_native.pack_int8),
 * a block's 16 columns as one 32-byte load. A tile is up to 4 rows x 48 columns: 12 int32
 * block sums and 12 fp32 sums in registers. Columns are shared out over OpenMP threads, 48 at a
 * time. */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#include "linear.h"

#define BLOCK 32 /* inputs sharing a weight scale, and an activation scale */
#define ROWS 4   /* rows of a tile: 4 x 3 int32 and fp32 sums, 3 weights, a broadcast */

static int64_t padded(int64_t k) { return (k + BLOCK - 1) / BLOCK * BLOCK; }

int linear_i8_pack(const int8_t *w, int64_t n, int64_t k, uint8_t *packed) {
    const int64_t kpad = padded(k), quads = kpad / 4, blocks = (n + COLS - 1) / COLS;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t p = 0; p < quads; p++)
            for (int64_t c = 0; c < COLS; c++)
                for (int64_t i = 0; i < 4; i++) {
                    const int64_t col = b * COLS + c, at = 4 * p + i;
                    const int v = col < n && at < k ? w[col * k + at] : 0;
                    if (v < -127) return -1; /* -128 + 128 would be 0: out of the symmetric range */
                    packed[((b * quads + p) * COLS + c) * 4 + i] = (uint8_t)(v + 128);
                }
    return 0;
}

/* One row's activations as int8 blocks: xq[kpad], each block's scale (its largest magnitude
 * over 127) and 128 x the sum of its int8 values (the unsigned weights' correction). */
static void quantize_row(const uint16_t *x, int64_t k, int8_t *xq, float *scale, int32_t *fix) {
    for (int64_t b = 0; b * BLOCK < k; b++) {
        const int64_t left = k - b * BLOCK;
        const __mmask32 mask = left >= BLOCK ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
        const __m512i h = _mm512_maskz_loadu_epi16(mask, x + b * BLOCK);
        const __m512 lo = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
        const __m512 hi = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        /* true divisions, as the reference's (this file builds without -ffast-math, which
         * would multiply by a rounded 1 / 127); capped where a tiny amax would give inf */
        const float inv = amax > 0 ? fminf(127.0f / amax, FLT_MAX) : 0.0f;
        const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
        const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(xq + b * BLOCK), _mm512_cvtsepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(xq + b * BLOCK + 16), _mm512_cvtsepi32_epi8(qhi));
        scale[b] = amax / 127.0f;
        fix[b] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
}

/* rows x vecs outputs of one tile (both constants where it is called). */
ALWAYS_INLINE void tile(const int8_t *xq, const float *xs, const int32_t *fix, int64_t kpad,
                        const int rows, const uint8_t *w, const int vecs, const uint8_t *next,
                        const uint16_t *scale, const uint16_t *bias, uint16_t *y, int64_t n,
                        int64_t cols_left) {
    const int64_t nblocks = kpad / BLOCK, strip = kpad * COLS; /* bytes of 16 columns */
    __m512 acc[ROWS][VECS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < vecs; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nblocks; b++) {
        __m512i dot[ROWS][VECS];
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < vecs; j++) dot[i][j] = _mm512_set1_epi32(-fix[i * nblocks + b]);
        const uint8_t *wb = w + b * BLOCK * COLS;
        if (next != NULL) /* this block's 512 bytes of each vector: 8 lines */
            for (int j = 0; j < vecs; j++)
                for (int line = 0; line < 8; line++)
                    _mm_prefetch((const char *)next + j * strip + b * BLOCK * COLS + line * 64,
                                 _MM_HINT_T1);
#pragma GCC unroll 8
        for (int quad = 0; quad < BLOCK / 4; quad++) {
            __m512i v[VECS];
            for (int j = 0; j < vecs; j++)
                v[j] = _mm512_loadu_si512(wb + j * strip + quad * 64);
            for (int i = 0; i < rows; i++) {
                int32_t four;
                __builtin_memcpy(&four, xq + i * kpad + b * BLOCK + quad * 4, 4);
                const __m512i a = _mm512_set1_epi32(four);
                for (int j = 0; j < vecs; j++) dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], v[j], a);
            }
        }
        __m512 ws[VECS];
        for (int j = 0; j < vecs; j++)
            ws[j] = _mm512_cvtph_ps(
                _mm256_loadu_si256((const __m256i *)(scale + (j * nblocks + b) * COLS)));
        for (int i = 0; i < rows; i++) {
            const __m512 s = _mm512_set1_ps(xs[i * nblocks + b]);
            for (int j = 0; j < vecs; j++)
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][j]),
                                            _mm512_mul_ps(ws[j], s), acc[i][j]);
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

#define TILE(R, V) tile(xq, xs, fix, kpad, R, w, V, next, scale, bias, y, n, cols_left)
/* Full-width tiles get a constant row count so that their sums stay in registers. */
ALWAYS_INLINE void any_tile(const int8_t *xq, const float *xs, const int32_t *fix, int64_t kpad,
                            int rows, const uint8_t *w, int vecs, const uint8_t *next,
                            const uint16_t *scale, const uint16_t *bias, uint16_t *y,
                            int64_t n, int64_t cols_left) {
    if (vecs < VECS) {
        TILE(rows, vecs);
        return;
    }
    switch (rows) {
    case 4: TILE(4, VECS); break;
    case 3: TILE(3, VECS); break;
    case 2: TILE(2, VECS); break;
    default: TILE(1, VECS); break;
    }
}
#undef TILE

int linear_i8(const uint16_t *x, int64_t m, int64_t k, const uint8_t *packed,
              const uint16_t *scale, int64_t n, const uint16_t *bias, uint16_t *y) {
    const int64_t kpad = padded(k), nblocks = kpad / BLOCK;
    if (m == 0) return 0; /* (malloc(0) may be NULL) */
    int8_t *xq = malloc((size_t)(m * kpad));
    float *xs = malloc(sizeof(float) * (size_t)(m * nblocks));
    int32_t *fix = malloc(sizeof(int32_t) * (size_t)(m * nblocks));
    if (xq == NULL || xs == NULL || fix == NULL) {
        free(xq), free(xs), free(fix);
        return -1;
    }
#pragma omp parallel for schedule(static) if (m * k >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < m; r++) /* a last block short of 32 is padded with zeros */
        quantize_row(x + r * k, k, xq + r * kpad, xs + r * nblocks, fix + r * nblocks);
    const int64_t blocks = (n + COLS - 1) / COLS, strips = (blocks + VECS - 1) / VECS;
    const int64_t strip_size = VECS * kpad * COLS; /* a strip: 48 columns of the weight */
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < strips; s++) {
        const int vecs = (int)(blocks - s * VECS < VECS ? blocks - s * VECS : VECS);
        const int64_t col = s * VECS * COLS;
        const uint8_t *w = packed + s * strip_size;
        for (int64_t r = 0; r < m; r += ROWS) {
            /* with more than one tile of rows the multiply outlasts the fetch from DRAM: the
             * first tile brings the next strip in meanwhile (alone, it would only compete) */
            const uint8_t *next = r == 0 && s + 2 < strips ? w + strip_size : NULL;
            any_tile(xq + r * kpad, xs + r * nblocks, fix + r * nblocks, kpad,
                     (int)(m - r < ROWS ? m - r : ROWS), w, vecs, next, scale + col * nblocks,
                     bias == NULL ? NULL : bias + col, y + r * n + col, n, n - col);
        }
    }
    free(xq), free(xs), free(fix);
    return 0;
}

#else /* without AVX-512 VNNI and BF16 the torch reference serves */
int linear_i8_pack(const int8_t *w, int64_t n, int64_t k, uint8_t *packed) {
    (void)w, (void)n, (void)k, (void)packed;
    return -1;
}

int linear_i8(const uint16_t *x, int64_t m, int64_t k, const uint8_t *packed,
              const uint16_t *scale, int64_t n, const uint16_t *bias, uint16_t *y) {
    (void)x, (void)m, (void)k, (void)packed, (void)scale, (void)n, (void)bias, (void)y;
    return -1;
}
#endif
