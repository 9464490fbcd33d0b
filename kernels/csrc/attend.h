/* What the decode attention kernels share (paged_decode.c, paged_decode_i8.c): scratch
 * memory, block prefetch, softmax and (AVX-512) sixteen dot products summed at once. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_HEAD_DIM 256

/* Blocks lie anywhere in the pool, so the hardware prefetcher stops at each one: a walk over a
 * sequence's blocks (from block `first` on) asks for the one PREFETCH_AHEAD places on while it
 * reads this one (the first step asks for all those before it too). Into L2: into L1, eight
 * blocks ahead evict what is being read, and a walk that asked one block ahead into L1 read
 * DRAM at ~5 GB/s against ~9 GB/s this way (RESULTS.md, 2026-12-07 third session). */
#define PREFETCH_AHEAD 8
static inline void prefetch_ahead(const void *cache, int64_t stride_bytes, const int64_t *table,
                                  int64_t first, int64_t b, int64_t nblocks, int64_t nbytes) {
    const int64_t from = b > first ? b + PREFETCH_AHEAD : b;
    for (int64_t a = from; a <= b + PREFETCH_AHEAD && a < nblocks; a++)
        for (int64_t off = 0; off < nbytes; off += 64)
            __builtin_prefetch((const char *)cache + table[a] * stride_bytes + off, 0, 1);
}

/* prefetch_ahead spread out: part `part` of `parts` of the block PREFETCH_AHEAD on, one part
 * before each piece of arithmetic over this block (the first block's first part asks for
 * every block up to there at once). A whole block's ~100 prefetches in one burst fill the
 * core's queue of misses and stall it until they drain; spread, they overlap the arithmetic:
 * a layer 1.55x faster in bf16, 1.17x in 8 bits (RESULTS.md, 2026-12-07 fourth session). */
static inline void prefetch_part(const void *cache, int64_t stride_bytes, const int64_t *table,
                                 int64_t first, int64_t b, int64_t nblocks, int64_t nbytes,
                                 int64_t part, int64_t parts) {
    if (b == first) {
        if (part == 0) prefetch_ahead(cache, stride_bytes, table, first, b, nblocks, nbytes);
        return;
    }
    const int64_t a = b + PREFETCH_AHEAD;
    if (a >= nblocks) return;
    const int64_t lines = nbytes / 64, lo = lines * part / parts, hi = lines * (part + 1) / parts;
    for (int64_t l = lo; l < hi; l++)
        __builtin_prefetch((const char *)cache + table[a] * stride_bytes + l * 64, 0, 1);
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

/* The positions a query at ctx - 1 sees: the last `window` of them (0: all). */
static inline int64_t first_seen(int64_t ctx, int64_t window) {
    return window > 0 && ctx > window ? ctx - window : 0;
}

/* Scores soft-capped, cap * tanh(s / cap) (Gemma 2), before the softmax; cap 0: none. */
static inline void soft_cap(float *s, int64_t n, float cap) {
    if (cap > 0.f)
        for (int64_t t = 0; t < n; t++) s[t] = cap * tanhf(s[t] / cap);
}

static inline void softmax(float *s, int64_t n) {
    float m = -INFINITY, sum = 0.f;
    for (int64_t t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
    for (int64_t t = 0; t < n; t++) {
        s[t] = expf(s[t] - m);
        sum += s[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < n; t++) s[t] *= inv;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* r[i] = the sum of v[i]'s lanes, for 16 vectors at once; ADD sums two vectors (fp32 lanes, or
 * int32 lanes carried in __m512 bits: the shuffles only move them). */
#define DEFINE_SUM16(NAME, ADD)                                                                 \
    static inline __m512 NAME(const __m512 v[16]) {                                             \
        __m512 w[8], u[4];                                                                      \
        for (int i = 0; i < 8; i++) /* each 128-bit lane: 2 partials of tokens 2i, 2i + 1 */    \
            w[i] = ADD(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),                               \
                       _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));                              \
        for (int i = 0; i < 4; i++) { /* each 128-bit lane: tokens 4i .. 4i + 3, one each */    \
            __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);         \
            u[i] = ADD(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),                               \
                       _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));                              \
        }                                                                                       \
        /* 128-bit lanes 0 + 1 and 2 + 3 of a and b, as a's two then b's two */                 \
        const __m512 lo = ADD(_mm512_shuffle_f32x4(u[0], u[1], 0x88),                            \
                              _mm512_shuffle_f32x4(u[0], u[1], 0xDD));                           \
        const __m512 hi = ADD(_mm512_shuffle_f32x4(u[2], u[3], 0x88),                            \
                              _mm512_shuffle_f32x4(u[2], u[3], 0xDD));                           \
        return ADD(_mm512_shuffle_f32x4(lo, hi, 0x88), /* lane i: tokens 4i .. 4i + 3 */        \
                   _mm512_shuffle_f32x4(lo, hi, 0xDD));                                         \
    }

static inline __m512 add_epi32_bits(__m512 a, __m512 b) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}
DEFINE_SUM16(sum16, _mm512_add_ps)
DEFINE_SUM16(sum16_epi32, add_epi32_bits)

/* Two tokens' values interleaved for a pairwise dot product (VDPBF16PS, VPDPWSSD) sum each 32
 * dims in the order 0-3, 8-11, ... (lo) and 4-7, 12-15, ... (hi): back to 0-15 (a), 16-31 (b). */
static inline void deinterleave(__m512 lo, __m512 hi, __m512 *a, __m512 *b) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    *a = _mm512_permutex2var_ps(lo, first, hi);
    *b = _mm512_permutex2var_ps(lo, _mm512_add_epi32(first, _mm512_set1_epi32(8)), hi);
}

#endif
