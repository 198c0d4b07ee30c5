/* y = x @ w^T (+ bias) in fp32 over a weight packed once at load time.
 *
 * torch's BLAS repacks the weight on every call to run its large-matrix kernel, which costs as
 * much memory traffic as the product itself when a decode step has a few rows. Here the weight
 * is packed once into panels of 16 output columns, each panel `[K][16]` contiguous, and a 6x16
 * register tile (12 accumulators of 8 floats) streams a panel once per 6 rows, with one
 * broadcast and two FMAs per row and k. Threads split the panels. On the project's AVX2 machine
 * this beat the BLAS at every row count measured (benchmarks/linear.py).
 *
 * Same sum per output as the BLAS (k in order, fp32, fused multiply-adds), so results differ
 * from torch's by rounding only.
 */
#include <stdint.h>
#include <string.h>

#include "parallel.h"
#include "vec.h"

#define NR 16 /* output columns per panel: two 8-float vectors */
#define MR 6  /* rows per register tile */

/* ------------------------------------------------------------------------------ packing */

typedef struct {
    const float *w;
    float *packed;
    int64_t n, k;
} pack_args;

static void pack_panels(void *ctx, int64_t begin, int64_t end) {
    const pack_args *a = (const pack_args *)ctx;
    for (int64_t p = begin; p < end; p++) {
        float *panel = a->packed + p * a->k * NR;
        for (int64_t j = 0; j < NR; j++) {
            const int64_t col = p * NR + j;
            if (col < a->n) {
                const float *row = a->w + col * a->k;
                for (int64_t kk = 0; kk < a->k; kk++) panel[kk * NR + j] = row[kk];
            } else {
                for (int64_t kk = 0; kk < a->k; kk++) panel[kk * NR + j] = 0.0f;
            }
        }
    }
}

/* w `[n, k]` row-major (a torch Linear weight) into `packed`, ceil(n / 16) * k * 16 floats. */
void stoke_pack_linear_weight_f32(const float *w, float *packed, int64_t n, int64_t k, int64_t num_threads) {
    pack_args a = {w, packed, n, k};
    parallel_for(pack_panels, &a, (n + NR - 1) / NR, 8, num_threads);
}

/* ------------------------------------------------------------------------------ product */

typedef struct {
    const float *x, *packed, *bias;
    float *y;
    int64_t m, n, k, x_stride, y_stride;
} linear_args;

/* R rows of x times one panel, written to y (all 16 columns, or the first `cols`). */
#define DEFINE_TILE(R)                                                                            \
    static void tile_##R(const float *restrict x, int64_t x_stride, const float *restrict panel, \
                         int64_t k, const float *bias, float *y, int64_t y_stride, int64_t cols) { \
        vf c0[R], c1[R];                                                                          \
        const vf b0_init = bias ? *(const vf *)bias : (vf){0};                                    \
        const vf b1_init = bias ? *(const vf *)(bias + VL) : (vf){0};                             \
        for (int r = 0; r < R; r++) {                                                             \
            c0[r] = b0_init;                                                                      \
            c1[r] = b1_init;                                                                      \
        }                                                                                         \
        _Pragma("GCC unroll 4") for (int64_t kk = 0; kk < k; kk++) {                              \
            const vf b0 = *(const vf *)(panel + kk * NR), b1 = *(const vf *)(panel + kk * NR + VL); \
            for (int r = 0; r < R; r++) {                                                         \
                const vf a = splat(x[r * x_stride + kk]);                                         \
                c0[r] += a * b0;                                                                  \
                c1[r] += a * b1;                                                                  \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < R; r++) {                                                             \
            if (cols == NR) {                                                                     \
                *(vf *)(y + r * y_stride) = c0[r];                                                \
                *(vf *)(y + r * y_stride + VL) = c1[r];                                           \
            } else {                                                                              \
                float tmp[NR];                                                                    \
                *(vf *)tmp = c0[r];                                                               \
                *(vf *)(tmp + VL) = c1[r];                                                        \
                memcpy(y + r * y_stride, tmp, (size_t)cols * sizeof(float));                      \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)

static void linear_panels(void *ctx, int64_t begin, int64_t end) {
    const linear_args *a = (const linear_args *)ctx;
    float bias_pad[NR];
    for (int64_t p = begin; p < end; p++) {
        const int64_t col = p * NR;
        const int64_t cols = a->n - col < NR ? a->n - col : NR;
        const float *panel = a->packed + p * a->k * NR;
        const float *bias = NULL;
        if (a->bias != NULL) {
            memset(bias_pad, 0, sizeof bias_pad);
            memcpy(bias_pad, a->bias + col, (size_t)cols * sizeof(float));
            bias = bias_pad;
        }
        for (int64_t row = 0; row < a->m; row += MR) {
            const float *x = a->x + row * a->x_stride;
            float *y = a->y + row * a->y_stride + col;
            const int64_t s = a->x_stride, t = a->y_stride;
            switch (a->m - row < MR ? a->m - row : MR) {
            case 1: tile_1(x, s, panel, a->k, bias, y, t, cols); break;
            case 2: tile_2(x, s, panel, a->k, bias, y, t, cols); break;
            case 3: tile_3(x, s, panel, a->k, bias, y, t, cols); break;
            case 4: tile_4(x, s, panel, a->k, bias, y, t, cols); break;
            case 5: tile_5(x, s, panel, a->k, bias, y, t, cols); break;
            default: tile_6(x, s, panel, a->k, bias, y, t, cols); break;
            }
        }
    }
}

/* y `[m, n]` (rows y_stride apart) = x `[m, k]` (rows x_stride apart) @ w^T + bias, w packed by
 * stoke_pack_linear_weight_f32; bias may be NULL. */
void stoke_linear_f32(const float *x, const float *packed, const float *bias, float *y, int64_t m, int64_t n,
                      int64_t k, int64_t x_stride, int64_t y_stride, int64_t num_threads) {
    linear_args a = {x, packed, bias, y, m, n, k, x_stride, y_stride};
    const int64_t panels = (n + NR - 1) / NR;
    /* a chunk of panels per hand-out: about 64 KiB of weight, and at least 2 chunks per thread */
    int64_t chunk = (16384 + k * NR - 1) / (k * NR);
    if (chunk * 2 * num_threads > panels) chunk = panels / (2 * num_threads);
    parallel_for(linear_panels, &a, panels, chunk < 1 ? 1 : chunk, num_threads);
}
