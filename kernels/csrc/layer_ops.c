/* The elementwise steps of a decoder layer on the CPU, fp32, each one pass over its rows:
 * RMSNorm with the residual add, rotary embedding in place, and SiLU(gate) * up. In torch
 * each is several ops, every one a pass over memory with its own temporary.
 *
 * Same arithmetic as engine/models/llama.py's torch code (fp32 throughout): the residual sum
 * x + r, then x * (1 / sqrt(mean(x^2) + eps)), then times the weight; rotary in HF's
 * rotate-half layout; silu(g) = g / (1 + exp(-g)). Only summation order differs.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "parallel.h"
#include "vec.h"

/* Below this many floats a call runs on one thread. */
#define PARALLEL_MIN_FLOATS (1 << 14)

static int64_t threads_for(int64_t floats, int64_t num_threads) {
    return floats < PARALLEL_MIN_FLOATS ? 1 : num_threads;
}

/* ------------------------------------------------------------------------------ RMSNorm */

typedef struct {
    const float *x, *residual, *weight;
    float *out, *residual_out;
    int64_t hidden, x_stride, residual_stride;
    float eps;
} rms_norm_args;

static void rms_norm_rows(void *ctx, int64_t begin, int64_t end) {
    const rms_norm_args *a = (const rms_norm_args *)ctx;
    const int64_t H = a->hidden;
    for (int64_t row = begin; row < end; row++) {
        const float *x = a->x + row * a->x_stride;
        float *out = a->out + row * H;
        const float *h = x;
        if (a->residual != NULL) { /* h = x + residual, kept as the next residual */
            const float *r = a->residual + row * a->residual_stride;
            float *sum = a->residual_out + row * H;
            int64_t i = 0;
            for (; i + VL <= H; i += VL) *(vf *)(sum + i) = *(const vf *)(x + i) + *(const vf *)(r + i);
            for (; i < H; i++) sum[i] = x[i] + r[i];
            h = sum;
        }
        vf acc = {0};
        float ss = 0.0f;
        int64_t i = 0;
        for (; i + VL <= H; i += VL) {
            const vf v = *(const vf *)(h + i);
            acc += v * v;
        }
        ss = hsum(acc);
        for (; i < H; i++) ss += h[i] * h[i];
        const float inv = 1.0f / sqrtf(ss / (float)H + a->eps);
        i = 0;
        for (; i + VL <= H; i += VL)
            *(vf *)(out + i) = *(const vf *)(a->weight + i) * (*(const vf *)(h + i) * inv);
        for (; i < H; i++) out[i] = a->weight[i] * (h[i] * inv);
    }
}

/* out = rmsnorm(x [+ residual]) * weight, rows of `hidden` floats; with a residual, also
 * residual_out = x + residual. x and residual rows may be strided; out rows are contiguous. */
void stoke_rms_norm_f32(const float *x, const float *residual, const float *weight, float *out,
                        float *residual_out, int64_t rows, int64_t hidden, int64_t x_stride,
                        int64_t residual_stride, float eps, int64_t num_threads) {
    rms_norm_args a = {x, residual, weight, out, residual_out, hidden, x_stride, residual_stride, eps};
    parallel_for(rms_norm_rows, &a, rows, 16, threads_for(rows * hidden, num_threads));
}

/* --------------------------------------------------------------------------------- rotary */

typedef struct {
    float *x;                 /* [T, heads, D] with strides token_stride, head_stride */
    const float *cos, *sin;   /* [max_positions, R / 2]: the leading R <= D dims rotate */
    const int64_t *positions; /* [T] */
    int64_t heads, rotary_dim, token_stride, head_stride;
} rotary_args;

static void rotary_rows(void *ctx, int64_t begin, int64_t end) {
    const rotary_args *a = (const rotary_args *)ctx;
    const int64_t half = a->rotary_dim / 2;
    for (int64_t t = begin; t < end; t++) {
        const float *c = a->cos + a->positions[t] * half;
        const float *s = a->sin + a->positions[t] * half;
        for (int64_t h = 0; h < a->heads; h++) {
            float *x1 = a->x + t * a->token_stride + h * a->head_stride, *x2 = x1 + half;
            int64_t i = 0;
            for (; i + VL <= half; i += VL) {
                const vf u = *(vf *)(x1 + i), v = *(vf *)(x2 + i);
                const vf cv = *(const vf *)(c + i), sv = *(const vf *)(s + i);
                *(vf *)(x1 + i) = u * cv - v * sv;
                *(vf *)(x2 + i) = v * cv + u * sv;
            }
            for (; i < half; i++) {
                const float u = x1[i], v = x2[i];
                x1[i] = u * c[i] - v * s[i];
                x2[i] = v * c[i] + u * s[i];
            }
        }
    }
}

/* Rotate x in place: the leading rotary_dim dims of every head of every token by its
   position's cos/sin (the rest of each head passes through: partial rotary). */
void stoke_rotary_f32(float *x, const float *cos, const float *sin, const int64_t *positions,
                      int64_t tokens, int64_t heads, int64_t rotary_dim, int64_t token_stride,
                      int64_t head_stride, int64_t num_threads) {
    rotary_args a = {x, cos, sin, positions, heads, rotary_dim, token_stride, head_stride};
    parallel_for(rotary_rows, &a, tokens, 16, threads_for(tokens * heads * rotary_dim, num_threads));
}

/* ---------------------------------------------------------------------------- SiLU * up */

typedef struct {
    const float *x; /* [T, 2 * I]: gate then up */
    float *out;     /* [T, I] */
    int64_t inner;
} silu_args;

static void silu_and_mul_rows(void *ctx, int64_t begin, int64_t end) {
    const silu_args *a = (const silu_args *)ctx;
    const int64_t I = a->inner;
    for (int64_t row = begin; row < end; row++) {
        const float *g = a->x + row * 2 * I, *u = g + I;
        float *out = a->out + row * I;
        int64_t i = 0;
        for (; i + VL <= I; i += VL) {
            const vf gv = *(const vf *)(g + i);
            *(vf *)(out + i) = gv / (1.0f + vexp(-gv)) * *(const vf *)(u + i);
        }
        for (; i < I; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

void stoke_silu_and_mul_f32(const float *x, float *out, int64_t rows, int64_t inner, int64_t num_threads) {
    silu_args a = {x, out, inner};
    parallel_for(silu_and_mul_rows, &a, rows, 16, threads_for(rows * inner, num_threads));
}
