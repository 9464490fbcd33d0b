/* RMSNorm fused with the residual add before it, bf16; kernels/norm.py is the reference and
 * its rounding is kept: the sum rounded to bf16, the norm in fp32, rounded to bf16, times the
 * weight, rounded again. Only the sum of squares runs in another order (one pass over the row,
 * where torch reads it twice more). fp32 stays on torch (kernels/norm_native.py). */
#include <math.h>

#include "common.h"

/* 1 / sqrt(mean + eps) correctly rounded, as torch's rsqrt is: -ffast-math would take the
 * CPU's approximate reciprocal square root instead (off by an ulp or two). */
__attribute__((optimize("no-fast-math"))) static float inverse_rms(float mean, float eps) {
    return 1.f / sqrtf(mean + eps);
}

int add_rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *weight,
                      int64_t rows, int64_t hidden, float eps, uint16_t *out, uint16_t *sum) {
#pragma omp parallel for if (rows * hidden >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * hidden, *rr = residual + r * hidden;
        uint16_t *h = sum + r * hidden, *o = out + r * hidden;
        float squares = 0.f;
        for (int64_t i = 0; i < hidden; i++) {
            h[i] = to_bf16(from_bf16(xr[i]) + from_bf16(rr[i]));
            squares += from_bf16(h[i]) * from_bf16(h[i]);
        }
        const float inv = inverse_rms(squares / (float)hidden, eps);
        for (int64_t i = 0; i < hidden; i++)
            o[i] = to_bf16(from_bf16(weight[i]) * from_bf16(to_bf16(from_bf16(h[i]) * inv)));
    }
    return 0;
}
