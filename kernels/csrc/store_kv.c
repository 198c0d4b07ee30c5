/* The contract's store_kv into fp8 (e4m3) caches: each token's keys and values divided by
 * k_scale / v_scale, clamped to +-448 and rounded to e4m3 (fp8.h, as torch converts), written
 * to its slot in one pass. kernels.reference's store takes a division, a clamp, a conversion
 * and an index copy, each a pass and a temporary; at a decode step's few tokens its calls cost
 * several times the fp32 store's, at a prefill chunk's thousands the passes do.
 *
 * Slots are checked before anything is written (negative: skip, as the reference skips them;
 * past the cache's end: the call stores nothing and says so, where the reference's index_copy_
 * raises). Tokens are shared out among the threads; the engine never maps two tokens to one
 * slot. */
#include <stdint.h>
#include <string.h>

#include "fp8.h"
#include "parallel.h"
#include "vec.h"

typedef struct {
    const float *key, *value;     /* [T, width] rows, key_stride / value_stride apart (elements) */
    int64_t key_stride, value_stride;
    uint8_t *k_cache, *v_cache;   /* [num_slots, width] bytes */
    const int64_t *slots;         /* [T], negative: skip */
    int64_t width;                /* num_kv_heads * head_dim */
    float k_scale, v_scale;
} store_args;

/* One row of `width` floats divided by scale, clamped and encoded into `out`. */
static void quantize_row(const float *x, int64_t width, float scale, uint8_t *out) {
    const vf s = splat(scale), lo = splat(-448.0f), hi = splat(448.0f);
    int64_t c = 0;
    for (; c + VL <= width; c += VL) {
        vf y = *(const vf *)(x + c) / s;
        y = vselect(y < lo, lo, y); /* NaN passes both, as torch's clamp lets it */
        y = vselect(y > hi, hi, y);
        encode8(y, out + c);
    }
    if (c < width) { /* the last few, through a padded vector */
        float tail[VL] = {0};
        uint8_t bytes[VL];
        memcpy(tail, x + c, (size_t)(width - c) * sizeof(float));
        vf y = *(const vf *)tail / s;
        y = vselect(y < lo, lo, y);
        y = vselect(y > hi, hi, y);
        encode8(y, bytes);
        memcpy(out + c, bytes, (size_t)(width - c));
    }
}

static void store_range(void *ctx, int64_t begin, int64_t end) {
    const store_args *a = (const store_args *)ctx;
    for (int64_t t = begin; t < end; t++) {
        const int64_t slot = a->slots[t];
        if (slot < 0) continue;
        quantize_row(a->key + t * a->key_stride, a->width, a->k_scale, a->k_cache + slot * a->width);
        quantize_row(a->value + t * a->value_stride, a->width, a->v_scale, a->v_cache + slot * a->width);
    }
}

/* key/value `[tokens, width]` fp32 (rows key_stride / value_stride elements apart) into the
 * e4m3 caches of num_slots rows of width bytes at `slots`. Returns 0, or (storing nothing) 1
 * if a slot is num_slots or more. */
int stoke_store_kv_fp8(const float *key, const float *value, uint8_t *k_cache, uint8_t *v_cache,
                       const int64_t *slots, int64_t tokens, int64_t width, int64_t key_stride,
                       int64_t value_stride, int64_t num_slots, float k_scale, float v_scale,
                       int64_t num_threads) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] >= num_slots) return 1;
    store_args a = {key, value, key_stride, value_stride, k_cache, v_cache, slots, width, k_scale, v_scale};
    /* A hand-out of at least 256 KiB of K/V (tens of microseconds): waking the thread team for
     * a decode step's few tokens would cost about what quantizing them does. */
    const int64_t chunk = 1 + 32768 / (width > 0 ? width : 1);
    parallel_for(store_range, &a, tokens, chunk, num_threads);
    return 0;
}
