/* What every kernel in csrc/ shares: bf16 <-> fp32 and the threshold for threading. */
#pragma once
#include <stdint.h>

static inline float from_bf16(uint16_t x) {
    union { uint32_t u; float f; } v = {(uint32_t)x << 16};
    return v.f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((v.u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

static inline float from_f32(float x) { return x; }
static inline float to_f32(float x) { return x; }

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Elementwise ops wake the OpenMP threads only from this many elements: below it the wake-up
 * costs more than the work (a decode batch of 32 rows of 576 is ~18k). */
#define PARALLEL_MIN_ELEMENTS 16384
