/* e4m3 (float8_e4m3fn) bytes to fp32 and back, exactly as torch converts: the decode shared
 * by the fp8 projections (linear_fp8.c) and the fp8 KV cache's attention (paged_attention.c),
 * the encode by the fp8 KV cache's store (store_kv.c).
 *
 * Each decoded float is 2^-8 of the byte's value (sign and subnormals exact; the NaN bytes
 * decode to 480 or -480, not NaN): callers fold the 2^8 into the scale they multiply by, a
 * power of two off, so the product is the same real number, rounded once. e4m3 is fp16 with 4
 * exponent bits and 3 mantissa bits: shifted into fp16's fields, (b & 0x7F) << 7 with the sign
 * at bit 15, it is an fp16 whose exponent bias is 15 rather than 7, so 2^-8 of the value,
 * subnormals included; the CPU's fp16 conversion (F16C) makes that exact fp32 normals.
 * -DSTOKE_FP8_PORTABLE builds the bit path that ARM and older x86 take on x86 too (the tests
 * check it). */
#ifndef STOKE_FP8_H
#define STOKE_FP8_H

#include <stdint.h>

#include "vec.h"

typedef uint32_t vu __attribute__((vector_size(32), aligned(4)));

#if defined(__F16C__) && defined(__AVX2__) && !defined(STOKE_FP8_PORTABLE)
#include <immintrin.h>
#define FP8_F16C 1
#endif

#ifdef FP8_F16C
/* 8 bytes to 8 floats. Sign-extended, << 7 sets bits 14 and 15 for a negative byte: clearing
 * 14 leaves the sign. */
static inline vf decode8(const uint8_t *p) {
    const __m128i wide = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p));
    const __m128i bits = _mm_and_si128(_mm_slli_epi16(wide, 7), _mm_set1_epi16((short)0xBFFF));
    return (vf)_mm256_cvtph_ps(bits);
}

/* 16 bytes to 16 floats, the same way with one 256-bit shift. */
static inline void decode16(const uint8_t *p, vf *lo, vf *hi) {
    const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i bits = _mm256_and_si256(_mm256_slli_epi16(wide, 7), _mm256_set1_epi16((short)0xBFFF));
    *lo = (vf)_mm256_cvtph_ps(_mm256_castsi256_si128(bits));
    *hi = (vf)_mm256_cvtph_ps(_mm256_extracti128_si256(bits, 1));
}
#else
/* The same values from the bits: a normal byte's exponent and mantissa shifted into fp32's
 * fields with the bias moved by 127 - 7 - 8; a subnormal one (exponent 0) is its mantissa m
 * times 2^-9 · 2^-8, an exact int-to-float conversion. No fp32 subnormal appears, so
 * flush-to-zero modes change nothing. */
static inline vf decode8(const uint8_t *p) {
    typedef uint8_t vb8 __attribute__((vector_size(8), aligned(1)));
    const vu b = __builtin_convertvector(*(const vb8 *)p, vu);
    const vu mag = b & 0x7F;
    const vf normal = (vf)((mag << 20) + (112u << 23));
    const vf subnormal = __builtin_convertvector((vi)mag, vf) * 0x1p-17f;
    return (vf)((vu)vselect((vi)(mag < 8), subnormal, normal) | (b & 0x80) << 24);
}

static inline void decode16(const uint8_t *p, vf *lo, vf *hi) {
    *lo = decode8(p);
    *hi = decode8(p + VL);
}
#endif

/* 8 floats to 8 e4m3 bytes, rounded to nearest even, as torch's fp32 -> float8_e4m3fn
 * conversion (c10's fp8e4m3fn_from_fp32_value) rounds: past 448 saturated, NaN to 0x7F with
 * its sign. From 2^-6 (e4m3's least normal) the fp32 bits rounded at bit 20, the exponent
 * rebiased from 127 to 7; below, adding 2^14 (whose ulp is e4m3's subnormal step, 2^-9) leaves
 * the rounded subnormal's mantissa in the sum's low bits. */
static inline void encode8(vf x, uint8_t *out) {
    typedef uint8_t vb8 __attribute__((vector_size(8), aligned(1)));
    const vu bits = (vu)x, sign = bits & 0x80000000u, mag = bits ^ sign;
    const vu normal = (mag + ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + ((mag >> 20) & 1u)) >> 20;
    const vu subnormal = (vu)((vf)mag + splat(0x1p14f)) - (141u << 23);
    const vu small = (vu)(mag < (121u << 23)), big = (vu)(mag >= (1087u << 20)), nan = (vu)(mag > 0x7F800000u);
    vu r = (subnormal & small) | (normal & ~small);
    r = (r & ~big) | (0x7Eu & big); /* 480 and up, infinity too */
    r = (r & ~nan) | (0x7Fu & nan);
    *(vb8 *)out = __builtin_convertvector(r | sign >> 24, vb8);
}

#endif
