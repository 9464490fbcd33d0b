/* What the bf16 and int8 linear kernels (linear.c, linear_i8.c) share: output columns come 16
 * to a vector, and each tile ends by adding the bias to its vectors, masked past n. Included
 * only where AVX-512 is. */
#pragma once
#include <immintrin.h>

#include "common.h"

#define COLS 16 /* output columns in one vector */
#define VECS 3  /* column vectors in a tile */

/* The lanes of a vector of COLS output columns of which `left` remain. */
ALWAYS_INLINE __mmask16 column_mask(int64_t left) {
    return left >= COLS ? 0xFFFF : (__mmask16)((1u << left) - 1);
}

/* Those columns' bias as fp32 (bf16 -> fp32 is a 16-bit shift); 0 without a bias. */
ALWAYS_INLINE __m512 bias_f32(const uint16_t *bias, __mmask16 mask) {
    if (bias == NULL) return _mm512_setzero_ps();
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias)), 16));
}
