/* 8-float vectors through GCC/Clang vector extensions: AVX2 registers on x86 (with
 * -march=native), two NEON registers on ARM. aligned(4) lets any float pointer be read as one
 * (unaligned loads). */
#ifndef STOKE_VEC_H
#define STOKE_VEC_H

#include <stdint.h>

typedef float vf __attribute__((vector_size(32), aligned(4)));
typedef int32_t vi __attribute__((vector_size(32), aligned(4)));
#define VL 8

/* An initializer, not `(vf){0} + x`: that is an add before the broadcast (0 + -0 is +0). */
static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }

static inline vf vselect(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* exp of 8 lanes: Cephes' expf (about 1 ulp), inputs clamped to [-87, 88] so the result
 * stays a normal finite float (about 1e-38 below, 1.6e38 above). */
static inline vf vexp(vf x) {
    x = vselect(x < splat(-87.0f), splat(-87.0f), x);
    x = vselect(x > splat(88.0f), splat(88.0f), x);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = (x * 1.44269504088896341f + magic) - magic;
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    /* 2^n in two halves, so n = 128 (x near 88) does not overflow the exponent field */
    const vi half = __builtin_convertvector(n, vi) >> 1;
    const vf a = (vf)((half + 127) << 23), b = (vf)((__builtin_convertvector(n, vi) - half + 127) << 23);
    return p * a * b;
}

static inline float hsum(vf x) {
    float s = 0.0f;
    for (int l = 0; l < VL; l++) s += x[l];
    return s;
}

#endif
