/* Sampling's ops over fp32 logits. Greedy sampling's argmax over each row, as torch.argmax gives it: the first
 * index of the largest value, and the first NaN where a row has one. torch runs this
 * reduction one element at a time (~0.6 ns each: 0.9 ms for 32 rows of SmolLM2's 49,152
 * tokens, 3% of a decode step); here 16 lanes each keep their own largest value and its first
 * index, and the lanes are merged at the end of the row. */
#include <math.h>

#include "common.h"

/* NaN tested on the bits: -ffast-math lets the compiler assume no float is a NaN. */
static inline int is_nan(float f) {
    union { float f; uint32_t u; } v = {f};
    return (v.u & 0x7FFFFFFF) > 0x7F800000;
}

static int64_t first_nan(const float *row, int64_t cols) {
    for (int64_t i = 0; i < cols; i++)
        if (is_nan(row[i])) return i;
    return -1;
}

#ifdef __AVX512F__
#include <immintrin.h>

static int64_t argmax_row(const float *row, int64_t cols) {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i best_at = _mm512_set1_epi32(INT32_MAX);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < cols; i += 16) {
        const __mmask16 in = cols - i >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - i)) - 1);
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, row + i);
        const __m512i bits = _mm512_and_si512(_mm512_castps_si512(v), magnitude);
        nan |= _mm512_cmpgt_epi32_mask(bits, inf);
        /* strictly greater, or the first -inf: a lane keeps the first index of its maximum */
        const __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) |
                               (in & _mm512_cmpeq_epi32_mask(best_at, _mm512_set1_epi32(INT32_MAX)));
        best = _mm512_mask_mov_ps(best, take, v);
        best_at = _mm512_mask_mov_epi32(best_at, take, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)i)));
    }
    if (nan) return first_nan(row, cols);
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    return _mm512_mask_reduce_min_epi32(tops, best_at);
}
#else
static int64_t argmax_row(const float *row, int64_t cols) {
    const int64_t nan = first_nan(row, cols);
    if (nan >= 0) return nan;
    int64_t at = 0;
    for (int64_t i = 1; i < cols; i++)
        if (row[i] > row[at]) at = i;
    return at;
}
#endif

int argmax_f32(const float *x, int64_t rows, int64_t cols, int64_t *out) {
    if (cols < 1 || cols > INT32_MAX) return -1;
#pragma omp parallel for if (rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * cols, cols);
    return 0;
}

/* A grammar's token bitmask (llguidance's: bit i of word w allows token 32w + i) applied to
 * row rows[r] of the logits: each banned token to -inf, found a set bit at a time (a word of
 * allowed tokens costs one test). Tokens past the mask's words are banned too. */
int apply_token_bitmask_f32(float *logits, int64_t vocab, const int32_t *mask, int64_t words,
                            const int64_t *rows, int64_t n) {
#pragma omp parallel for if (n * vocab >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < n; r++) {
        float *row = logits + rows[r] * vocab;
        const uint32_t *m = (const uint32_t *)mask + r * words;
        for (int64_t w = 0; 32 * w < vocab; w++) {
            uint32_t banned = w < words ? ~m[w] : 0xFFFFFFFFu;
            for (; banned; banned &= banned - 1) {
                const int64_t t = 32 * w + __builtin_ctz(banned);
                if (t < vocab) row[t] = -INFINITY;
            }
        }
    }
    return 0;
}
