/* y = x @ dequant(w)^T (+ bias) in fp32 over an fp8 (e4m3) weight packed once at load time.
 *
 * The weight stays one byte per element, packed into panels of 16 output columns `[K][16]` like
 * linear.c's fp32 panels, and is dequantized as the product reads it: a decode step reads a
 * quarter of the fp32 product's bytes. Each k turns the panel's 16 bytes into 16 floats and
 * multiplies them by the 16 columns' scales for the group k falls in (two vectors, loaded once
 * per group), then come the fp32 tile's two FMAs per row.
 *
 * Where x has one register tile of rows (up to 6: decode) that happens in the tile, in
 * registers. With more rows every tile would decode the panel again (the decode costs more than
 * 6 rows' FMAs), so a block of the panel is dequantized once into memory that stays in cache
 * and each tile of rows runs linear.c's fp32 tile over it.
 *
 * The dequantized element is the reference's w.float() * scale, rounded once in fp32: the
 * decode is exact, at 2^-8 of the value (fp8.h), and the scale vectors hold scale * 256, a
 * power of two off, so their product is the same real number. Both paths then do the same FMAs
 * in k order: they agree bit for bit, and differ from kernels.reference.fp8_linear by summation
 * order only.
 */
#include <stdint.h>
#include <string.h>

#include "fp8.h"
#include "parallel.h"
#include "vec.h"

#define NR 16 /* output columns per panel: two 8-float vectors */
#define MR 6  /* rows per register tile */

/* ------------------------------------------------------------------------------ packing */

typedef struct {
    const uint8_t *w;
    uint8_t *packed;
    int64_t n, k;
} pack_args;

static void pack_panels(void *ctx, int64_t begin, int64_t end) {
    const pack_args *a = (const pack_args *)ctx;
    for (int64_t p = begin; p < end; p++) {
        uint8_t *panel = a->packed + p * a->k * NR;
        for (int64_t j = 0; j < NR; j++) {
            const int64_t col = p * NR + j;
            const uint8_t *row = col < a->n ? a->w + col * a->k : NULL;
            for (int64_t kk = 0; kk < a->k; kk++) panel[kk * NR + j] = row ? row[kk] : 0; /* 0: +0.0 */
        }
    }
}

/* w `[n, k]` bytes row-major (an fp8 Linear weight) into `packed`, ceil(n / 16) * k * 16 bytes. */
void stoke_pack_linear_weight_u8(const uint8_t *w, uint8_t *packed, int64_t n, int64_t k, int64_t num_threads) {
    pack_args a = {w, packed, n, k};
    parallel_for(pack_panels, &a, (n + NR - 1) / NR, 8, num_threads);
}

/* ------------------------------------------------------------------------------ product */

/* k per dequantized block: 1024 x 16 floats, 64 KiB on the stack, in L2. Each block is a pass
 * of every tile of rows over its k, restarting the tile's 6 row streams of x: with blocks of
 * 256 k (in L1) the product was 4-17% slower than the fp32 one at 64-512 rows, with 1024 at
 * most 7%, with 2048 hardly better. */
#define KC 1024

typedef struct {
    const float *x, *scale, *bias;
    const uint8_t *packed;
    float *y;
    int64_t m, n, k, groups, group_size, x_stride, y_stride;
} linear_args;

/* The panel's scales for group g, times 256 (the decode's 2^-8), into s0/s1; 0 past `cols`. */
static inline void group_scales(const float *scale, int64_t groups, int64_t g, int64_t cols, vf *s0, vf *s1) {
    float s[NR] = {0};
    for (int64_t j = 0; j < cols; j++) s[j] = scale[j * groups + g] * 256.0f;
    *s0 = *(const vf *)s;
    *s1 = *(const vf *)(s + VL);
}

/* Rows k0..k1 of a panel dequantized into `out` `[k1 - k0][16]`: one scale load per group.
 * `scale` is the panel's first column's row of scales. */
static void dequantize_block(const uint8_t *restrict panel, const float *scale, const linear_args *a,
                             int64_t cols, int64_t k0, int64_t k1, float *restrict out) {
    for (int64_t kk = k0; kk < k1;) {
        const int64_t g = kk / a->group_size;
        const int64_t end = (g + 1) * a->group_size < k1 ? (g + 1) * a->group_size : k1;
        vf s0, s1;
        group_scales(scale, a->groups, g, cols, &s0, &s1);
        for (; kk < end; kk++) {
            vf b0, b1;
            decode16(panel + kk * NR, &b0, &b1);
            *(vf *)(out + (kk - k0) * NR) = b0 * s0;
            *(vf *)(out + (kk - k0) * NR + VL) = b1 * s1;
        }
    }
}

/* 16 floats of `src` (its first `cols`, the rest 0; NULL: all 0) into two vectors. */
static inline void load_row(const float *src, int64_t cols, vf *c0, vf *c1) {
    float tmp[NR] = {0};
    if (src != NULL && cols == NR) {
        *c0 = *(const vf *)src;
        *c1 = *(const vf *)(src + VL);
        return;
    }
    if (src != NULL) memcpy(tmp, src, (size_t)cols * sizeof(float));
    *c0 = *(const vf *)tmp;
    *c1 = *(const vf *)(tmp + VL);
}

/* Two vectors into the first `cols` floats of `dst`. */
static inline void store_row(float *dst, int64_t cols, vf c0, vf c1) {
    if (cols == NR) {
        *(vf *)dst = c0;
        *(vf *)(dst + VL) = c1;
        return;
    }
    float tmp[NR];
    *(vf *)tmp = c0;
    *(vf *)(tmp + VL) = c1;
    memcpy(dst, tmp, (size_t)cols * sizeof(float));
}

/* The tiles: R rows of x times (part of) a panel, onto `init`'s rows (init_stride apart: the
 * bias for every row, or y's own rows; NULL: 0), written to y (all 16 columns, or the first
 * `cols`). Both do, per output, the same chain of FMAs over the same dequantized fp32 weights
 * in k order, so they agree bit for bit. */

/* A whole panel, dequantized in registers as it streams: for one tile's rows (a decode step),
 * where nothing would share a dequantized copy. */
#define DEFINE_STREAM_TILE(R)                                                                      \
    static void stream_tile_##R(const float *restrict x, int64_t x_stride, const uint8_t *restrict panel, \
                                const float *restrict scale, const linear_args *a, const float *init, \
                                float *y, int64_t cols) {                                          \
        vf c0[R], c1[R];                                                                           \
        for (int r = 0; r < R; r++) load_row(init, cols, &c0[r], &c1[r]);                         \
        for (int64_t g = 0; g < a->groups; g++) {                                                  \
            vf s0, s1;                                                                             \
            group_scales(scale, a->groups, g, cols, &s0, &s1);                                     \
            const int64_t end = (g + 1) * a->group_size < a->k ? (g + 1) * a->group_size : a->k;  \
            _Pragma("GCC unroll 4") for (int64_t kk = g * a->group_size; kk < end; kk++) {         \
                vf b0, b1;                                                                         \
                decode16(panel + kk * NR, &b0, &b1);                                               \
                b0 *= s0;                                                                          \
                b1 *= s1;                                                                          \
                for (int r = 0; r < R; r++) {                                                      \
                    const vf xr = splat(x[r * x_stride + kk]);                                     \
                    c0[r] += xr * b0;                                                              \
                    c1[r] += xr * b1;                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < R; r++) store_row(y + r * a->y_stride, cols, c0[r], c1[r]);           \
    }

/* kc k of a block that dequantize_block wrote, for x's rows from that block's first k: where
 * several tiles of rows share the block, the decode is paid once per block, not per tile. Over
 * a panel's blocks y holds the partial sums, which fp32 round-trips exactly. */
#define DEFINE_BLOCK_TILE(R)                                                                       \
    static void block_tile_##R(const float *restrict x, int64_t x_stride, const float *restrict block, \
                               int64_t kc, const float *init, int64_t init_stride, float *y,       \
                               int64_t y_stride, int64_t cols) {                                   \
        vf c0[R], c1[R];                                                                           \
        for (int r = 0; r < R; r++) load_row(init ? init + r * init_stride : NULL, cols, &c0[r], &c1[r]); \
        _Pragma("GCC unroll 4") for (int64_t kk = 0; kk < kc; kk++) {                              \
            const vf b0 = *(const vf *)(block + kk * NR), b1 = *(const vf *)(block + kk * NR + VL); \
            for (int r = 0; r < R; r++) {                                                          \
                const vf xr = splat(x[r * x_stride + kk]);                                         \
                c0[r] += xr * b0;                                                                  \
                c1[r] += xr * b1;                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < R; r++) store_row(y + r * y_stride, cols, c0[r], c1[r]);              \
    }

DEFINE_STREAM_TILE(1)
DEFINE_STREAM_TILE(2)
DEFINE_STREAM_TILE(3)
DEFINE_STREAM_TILE(4)
DEFINE_STREAM_TILE(5)
DEFINE_STREAM_TILE(6)
DEFINE_BLOCK_TILE(1)
DEFINE_BLOCK_TILE(2)
DEFINE_BLOCK_TILE(3)
DEFINE_BLOCK_TILE(4)
DEFINE_BLOCK_TILE(5)
DEFINE_BLOCK_TILE(6)

/* All of x's rows (at most MR) times one panel, dequantized as it streams. */
static void stream_panel(const linear_args *a, const uint8_t *panel, const float *scale, const float *bias,
                         float *y, int64_t cols) {
    const float *x = a->x;
    const int64_t s = a->x_stride;
    switch (a->m) {
    case 1: stream_tile_1(x, s, panel, scale, a, bias, y, cols); break;
    case 2: stream_tile_2(x, s, panel, scale, a, bias, y, cols); break;
    case 3: stream_tile_3(x, s, panel, scale, a, bias, y, cols); break;
    case 4: stream_tile_4(x, s, panel, scale, a, bias, y, cols); break;
    case 5: stream_tile_5(x, s, panel, scale, a, bias, y, cols); break;
    default: stream_tile_6(x, s, panel, scale, a, bias, y, cols); break;
    }
}

/* x's rows times one panel, a block of KC k at a time: each block dequantized once into
 * `block`, then every tile of rows over it. */
static void block_panel(const linear_args *a, const uint8_t *panel, const float *scale, const float *bias,
                        float *y_panel, int64_t cols, float *block) {
    for (int64_t k0 = 0; k0 < a->k; k0 += KC) {
        const int64_t kc = a->k - k0 < KC ? a->k - k0 : KC;
        dequantize_block(panel, scale, a, cols, k0, k0 + kc, block);
        for (int64_t row = 0; row < a->m; row += MR) {
            const float *x = a->x + row * a->x_stride + k0;
            float *y = y_panel + row * a->y_stride;
            const float *init = k0 > 0 ? y : bias;  /* the first block starts from the bias */
            const int64_t s = a->x_stride, i = k0 > 0 ? a->y_stride : 0, t = a->y_stride;
            switch (a->m - row < MR ? a->m - row : MR) {
            case 1: block_tile_1(x, s, block, kc, init, i, y, t, cols); break;
            case 2: block_tile_2(x, s, block, kc, init, i, y, t, cols); break;
            case 3: block_tile_3(x, s, block, kc, init, i, y, t, cols); break;
            case 4: block_tile_4(x, s, block, kc, init, i, y, t, cols); break;
            case 5: block_tile_5(x, s, block, kc, init, i, y, t, cols); break;
            default: block_tile_6(x, s, block, kc, init, i, y, t, cols); break;
            }
        }
    }
}

static void linear_panels(void *ctx, int64_t begin, int64_t end) {
    const linear_args *a = (const linear_args *)ctx;
    float bias_pad[NR];
    float block[KC * NR];
    for (int64_t p = begin; p < end; p++) {
        const int64_t col = p * NR;
        const int64_t cols = a->n - col < NR ? a->n - col : NR;
        const uint8_t *panel = a->packed + p * a->k * NR;
        const float *scale = a->scale + col * a->groups;
        const float *bias = NULL;
        if (a->bias != NULL) {
            memset(bias_pad, 0, sizeof bias_pad);
            memcpy(bias_pad, a->bias + col, (size_t)cols * sizeof(float));
            bias = bias_pad;
        }
        if (a->m <= MR)
            stream_panel(a, panel, scale, bias, a->y + col, cols);
        else
            block_panel(a, panel, scale, bias, a->y + col, cols, block);
    }
}

/* y `[m, n]` (rows y_stride apart) = x `[m, k]` (rows x_stride apart) @ dequant(w)^T + bias, w
 * packed by stoke_pack_linear_weight_u8 from e4m3 bytes, `scale` `[n, groups]` fp32 (row j's
 * group g covers columns g * group_size .. min((g + 1) * group_size, k)); bias may be NULL. */
void stoke_linear_fp8(const float *x, const uint8_t *packed, const float *scale, const float *bias, float *y,
                      int64_t m, int64_t n, int64_t k, int64_t group_size, int64_t x_stride, int64_t y_stride,
                      int64_t num_threads) {
    if (m <= 0 || n <= 0 || k <= 0 || group_size <= 0) return; /* cpu_ops.fp8_linear serves these */
    linear_args a = {x, scale, bias, packed, y, m, n, k, (k + group_size - 1) / group_size, group_size,
                     x_stride, y_stride};
    const int64_t panels = (n + NR - 1) / NR;
    /* a chunk of panels per hand-out: about 64 KiB of weight, and at least 2 chunks per thread */
    int64_t chunk = (65536 + k * NR - 1) / (k * NR);
    if (chunk * 2 * num_threads > panels) chunk = panels / (2 * num_threads);
    parallel_for(linear_panels, &a, panels, chunk < 1 ? 1 : chunk, num_threads);
}

/* ------------------------------------------------------------------------------ dequantizing */

static void dequantize_panels(void *ctx, int64_t begin, int64_t end) {
    const linear_args *a = (const linear_args *)ctx;
    float block[KC * NR];
    for (int64_t p = begin; p < end; p++) {
        const int64_t col = p * NR;
        const int64_t cols = a->n - col < NR ? a->n - col : NR;
        for (int64_t k0 = 0; k0 < a->k; k0 += KC) {
            const int64_t kc = a->k - k0 < KC ? a->k - k0 : KC;
            dequantize_block(a->packed + p * a->k * NR, a->scale + col * a->groups, a, cols, k0, k0 + kc, block);
            for (int64_t j = 0; j < cols; j++) {
                float *row = a->y + (col + j) * a->k + k0;
                for (int64_t kk = 0; kk < kc; kk++) row[kk] = block[kk * NR + j];
            }
        }
    }
}

/* The fp32 weight `[n, k]` (row-major, into w) of an fp8 weight packed by
 * stoke_pack_linear_weight_u8 with its `scale` `[n, groups]`: each element the product's, for
 * the rows where torch's BLAS takes the product. One pass: a third of the memory traffic of
 * unpacking, widening and scaling in torch. */
void stoke_dequantize_fp8(const uint8_t *packed, const float *scale, float *w, int64_t n, int64_t k,
                          int64_t group_size, int64_t num_threads) {
    if (n <= 0 || k <= 0 || group_size <= 0) return;
    linear_args a = {NULL, scale, NULL, packed, w, 0, n, k, (k + group_size - 1) / group_size, group_size, 0, 0};
    parallel_for(dequantize_panels, &a, (n + NR - 1) / NR, 4, num_threads);
}
