/* What the decode attention kernels share (paged_decode.c, paged_decode_i8.c): scratch
 * memory, block prefetch, softmax and (AVX-512) sixteen dot products summed at once. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_HEAD_DIM 256

/* Blocks lie anywhere in the pool, so the hardware prefetcher stops at each one: ask for the
 * next block while this one is being read (in the engine the KV comes from DRAM). */
static inline void prefetch(const void *first, int64_t nbytes) {
    for (int64_t off = 0; off < nbytes; off += 64) __builtin_prefetch((const char *)first + off, 0, 3);
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

/* r[i] = the sum of v[i]'s lanes, for 16 vectors at once. */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 w[8], u[4];
    for (int i = 0; i < 8; i++) /* each 128-bit lane: 2 partial sums of tokens 2i, 2i + 1 */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* each 128-bit lane: tokens 4i .. 4i + 3, one partial each */
        __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* 128-bit lanes 0 + 1 and 2 + 3 of a and b, as a's two then b's two */
#define ADD_LANE_PAIRS(a, b) \
    _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD))
    const __m512 lo = ADD_LANE_PAIRS(u[0], u[1]), hi = ADD_LANE_PAIRS(u[2], u[3]);
    return ADD_LANE_PAIRS(lo, hi); /* lane i: tokens 4i .. 4i + 3, whole sums */
#undef ADD_LANE_PAIRS
}

#endif
