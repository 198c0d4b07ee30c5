/* Paged decode attention for the CPU, fp32: the contract's paged_decode_attention, reading
 * each K/V row of the paged cache once, in place (no gather into a dense copy), from an fp32
 * cache or an fp8 (e4m3) one.
 *
 * A work item is one sequence, all its heads: each cache block (block_size slots of every kv
 * head, contiguous) is read once per pass, and the query heads of one kv head (GQA) reuse the
 * rows while they are in L1. Per item: scores for every key (one pass over K), softmax in
 * place, then the weighted sum of V (one pass over V). With fewer sequences than twice the
 * threads (one user's decode), an item is one (sequence, kv head) instead, so the threads
 * share a long sequence rather than idle; with many, whole rows read contiguously are
 * faster (batch 256 of a tiny model: per-head items took 18% longer). Threads take items from
 * a shared counter, longest contexts first (the caller sorts decodes by context length
 * ascending, so the items are walked from the end). Loops are written over 8-float vectors (GCC/Clang
 * vector extensions: AVX2 on x86, two NEON registers on ARM) with the head dim a constant for
 * 64 and 128, so the compiler keeps the accumulators in registers.
 *
 * A sliding window (window > 0) starts a sequence's key loop at its last `window` keys: the
 * blocks before them are never read. A softcap (softcap > 0, Gemma 2) replaces each scaled
 * score s by softcap * tanh(s / softcap) in one vectorised pass over the scores before the
 * softmax, so the uncapped path runs the very same loops as before.
 *
 * An fp8 cache (vLLM's kv_cache_dtype="fp8") holds a quarter of the bytes, and decode reads
 * them all each step. Each kv head's rows of a block are decoded once (fp8.h: exact) and
 * multiplied by k_scale or v_scale into a scratch block that stays in L1, rounded once as
 * kernels.reference.dequantize_kv does; its query heads then run the fp32 loops over that
 * block. So the fp8 kernel computes bit for bit what the fp32 one does over the dequantized
 * cache. One item function serves both, with FP8 a constant (as D is): the fp32 instances
 * compile to the very instructions they had before the fp8 cache came (the same assembly).
 *
 * Built by kernels/native.py with the machine's C compiler and loaded through ctypes: plain C
 * with no Python or torch headers, so it compiles in about a second. Threads: parallel.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fp8.h"
#include "parallel.h"
#include "vec.h"

#define MAX_HEAD_DIM 256 /* the caller sends larger or non-multiple-of-VL head dims elsewhere */

typedef struct {
    const float *q;              /* [B, Hq, D] with strides q_stride_b, q_stride_h (elements) */
    const void *k_cache;         /* [num_blocks, block_size, Hkv, D], contiguous: fp32, or e4m3 bytes */
    const void *v_cache;
    const int32_t *block_tables; /* [B, table_stride] */
    const int32_t *context_lens; /* [B] */
    float *out;                  /* [B, Hq, D], contiguous */
    int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, table_stride;
    int64_t q_stride_b, q_stride_h;
    float scale;
    int64_t window;              /* > 0: only the last `window` keys of each sequence */
    float softcap;               /* > 0: scores capped by softcap * tanh(s / softcap) */
    int64_t heads_per_item;      /* kv heads per work item: num_kv_heads, or 1 for few sequences */
    int fp8;                     /* the caches hold e4m3 bytes, read times k_mult / v_mult */
    float k_mult, v_mult;        /* k_scale, v_scale times 2^8 (fp8.h decodes to 2^-8 of the value) */
    int failed;                  /* set when scratch memory could not be had */
} decode_args;

/* out[j] = scale * q . k_j for the n rows of one cache block, 4 rows at a time so the
 * multiply-add chains are independent. D is a multiple of VL. */
static inline __attribute__((always_inline)) void block_scores(
    const float *q, const float *krow, int64_t n, int64_t row_stride, float scale, float *out,
    const int64_t D) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = krow + j * row_stride, *k1 = k0 + row_stride;
        const float *k2 = k1 + row_stride, *k3 = k2 + row_stride;
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t c = 0; c < D; c += VL) {
            const vf qv = *(const vf *)(q + c);
            a0 += qv * *(const vf *)(k0 + c);
            a1 += qv * *(const vf *)(k1 + c);
            a2 += qv * *(const vf *)(k2 + c);
            a3 += qv * *(const vf *)(k3 + c);
        }
        out[j] = hsum(a0) * scale;
        out[j + 1] = hsum(a1) * scale;
        out[j + 2] = hsum(a2) * scale;
        out[j + 3] = hsum(a3) * scale;
    }
    for (; j < n; j++) {
        const float *k0 = krow + j * row_stride;
        vf a0 = {0};
        for (int64_t c = 0; c < D; c += VL) a0 += *(const vf *)(q + c) * *(const vf *)(k0 + c);
        out[j] = hsum(a0) * scale;
    }
}

/* acc += sum_j p[j] v_j over the n rows of one cache block; acc stays in registers. */
static inline __attribute__((always_inline)) void block_weighted_sum(
    const float *p, const float *vrow, int64_t n, int64_t row_stride, float *acc, const int64_t D) {
    vf a[MAX_HEAD_DIM / VL];
    for (int64_t c = 0; c < D / VL; c++) a[c] = *(const vf *)(acc + c * VL);
    for (int64_t j = 0; j < n; j++, vrow += row_stride) {
        const vf pj = (vf){0} + p[j];
        for (int64_t c = 0; c < D / VL; c++) a[c] += pj * *(const vf *)(vrow + c * VL);
    }
    for (int64_t c = 0; c < D / VL; c++) *(vf *)(acc + c * VL) = a[c];
}

/* tanh of 8 lanes, as Cephes' tanhf (a few ulp): an odd polynomial below |x| = 0.625, where
 * 1 - 2 / (e^2|x| + 1) would lose digits to cancellation, that formula above (vexp clamps,
 * so large |x| gives exactly +-1, never inf / inf). */
static inline vf vtanh(vf x) {
    const vi sign = (vi)x & (vi)splat(-0.0f);
    const vf a = (vf)((vi)x & ~(vi)splat(-0.0f));
    const vf big = 1.0f - 2.0f / (vexp(a + a) + 1.0f);
    const vf z = x * x;
    const vf small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                       + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
    return vselect(a < splat(0.625f), small, (vf)((vi)big | sign));
}

/* s[t] = cap * tanh(s[t] / cap) for the n scores of one head. */
static void softcap_scores(float *s, int64_t n, float cap) {
    const float inv = 1.0f / cap;
    int64_t t = 0;
    for (; t + VL <= n; t += VL) *(vf *)(s + t) = cap * vtanh(*(vf *)(s + t) * inv);
    for (; t < n; t++) s[t] = cap * tanhf(s[t] * inv);
}

/* n rows of one kv head's e4m3 K or V (row_stride bytes apart) into out `[n][D]`, each times
 * mult: the reference's byte.float() * scale, rounded once (mult is scale * 2^8, a power of
 * two off the decode's 2^-8, so the product is the same real number). */
static inline __attribute__((always_inline)) void dequantize_rows(
    const uint8_t *rows, int64_t n, int64_t row_stride, float mult, float *out, const int64_t D) {
    const vf m = splat(mult);
    for (int64_t j = 0; j < n; j++, rows += row_stride, out += D) {
        int64_t c = 0;
        for (; c + 2 * VL <= D; c += 2 * VL) { /* 16 bytes a step: one widening for two vectors */
            vf lo, hi;
            decode16(rows + c, &lo, &hi);
            *(vf *)(out + c) = lo * m;
            *(vf *)(out + c + VL) = hi * m;
        }
        if (c < D) *(vf *)(out + c) = decode8(rows + c) * m;
    }
}

/* Ask for one kv head's rows of the next cache block (into L2) while this one is worked on:
 * blocks are scattered, so the hardware prefetcher can't guess where the next one starts. */
static inline void prefetch_rows(const float *rows, int64_t n, int64_t row_stride, int64_t D) {
    for (int64_t j = 0; j < n; j++, rows += row_stride)
        for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(rows + c, 0, 1);
}

/* The same for an fp8 cache's rows of `bytes` bytes. */
static inline void prefetch_bytes(const uint8_t *rows, int64_t n, int64_t row_stride, int64_t bytes) {
    for (int64_t j = 0; j < n; j++, rows += row_stride)
        for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(rows + c, 0, 1);
}

/* How many of a sequence's ctx keys it sees: all, or its last `window` (window > 0). */
static inline int64_t keys_seen(int64_t ctx, int64_t window) {
    return window > 0 && ctx > window ? window : ctx;
}

/* One sequence's kv heads [h0, h0 + nh) with their query heads (nh * group of them, `heads`)
 * over its keys [first, ctx) (all ctx of them, or the window's last ones); `scores` holds
 * heads * (ctx - first), `acc` heads * D, `block` (fp8) block_size * D. Inlined with D a
 * constant for the common head dims, so the inner loops unroll fully, and FP8 a constant. */
static inline __attribute__((always_inline)) void decode_item(
    const decode_args *a, int64_t b, int64_t h0, int64_t nh, float *scores, float *acc, float *block,
    const int64_t D, const int FP8) {
    const int64_t bs = a->block_size, Hkv = a->num_kv_heads, Hq = a->num_heads;
    const int64_t group = Hq / Hkv, heads = nh * group;
    const int64_t ctx = a->context_lens[b];
    float *out = a->out + (b * Hq + h0 * group) * D;
    if (ctx <= 0) { /* padding rows: no keys, a zero output */
        memset(out, 0, (size_t)(heads * D) * sizeof(float));
        return;
    }
    const int32_t *table = a->block_tables + b * a->table_stride;
    const int64_t row_stride = Hkv * D; /* between consecutive slots of one block */
    const int64_t block_elems = bs * row_stride;
    const int64_t first = ctx - keys_seen(ctx, a->window);
    const int64_t len = ctx - first; /* keys seen; scores[head * len + t - first] is key t's */
    const int64_t first_block = first / bs, num_blocks = (ctx + bs - 1) / bs;
    const float *q = a->q + b * a->q_stride_b + h0 * group * a->q_stride_h;
    /* The item's first kv head in each slot: fp32 rows, or (FP8) e4m3 bytes. */
    const float *k_rows = FP8 ? NULL : (const float *)a->k_cache + h0 * D;
    const float *v_rows = FP8 ? NULL : (const float *)a->v_cache + h0 * D;
    const uint8_t *k_bytes = FP8 ? (const uint8_t *)a->k_cache + h0 * D : NULL;
    const uint8_t *v_bytes = FP8 ? (const uint8_t *)a->v_cache + h0 * D : NULL;

    /* Pass 1: scores = q . k * scale. Block i holds keys [t0, t1), read from its row t0 % bs. */
    for (int64_t i = first_block; i < num_blocks; i++) {
        const int64_t t0 = i == first_block ? first : i * bs, t1 = ctx - i * bs < bs ? ctx : (i + 1) * bs;
        if (FP8) { /* each kv head's rows decoded once, then the fp32 loop for each of its query heads */
            const uint8_t *rows = k_bytes + (int64_t)table[i] * block_elems + (t0 - i * bs) * row_stride;
            const uint8_t *next = i + 1 < num_blocks ? k_bytes + (int64_t)table[i + 1] * block_elems
                                                     : v_bytes + (int64_t)table[first_block] * block_elems;
            for (int64_t kv = 0; kv < nh; kv++) {
                /* The next block's rows a kv head at a time, between this block's: a quarter of the
                 * bytes goes 4x as fast, and asking for the whole next block at once stalled on the
                 * misses in flight (the kernel took a third longer at contexts past the caches). */
                prefetch_bytes(next + kv * D, bs, row_stride, D);
                dequantize_rows(rows + kv * D, t1 - t0, row_stride, a->k_mult, block, D);
                for (int64_t head = kv * group; head < (kv + 1) * group; head++)
                    block_scores(q + head * a->q_stride_h, block, t1 - t0, D, a->scale,
                                 scores + head * len + t0 - first, D);
            }
            continue;
        }
        const float *rows = k_rows + (int64_t)table[i] * block_elems + (t0 - i * bs) * row_stride;
        prefetch_rows(i + 1 < num_blocks ? k_rows + (int64_t)table[i + 1] * block_elems
                                         : v_rows + (int64_t)table[first_block] * block_elems,
                      bs, row_stride, nh * D);
        for (int64_t head = 0; head < heads; head++)
            block_scores(q + head * a->q_stride_h, rows + head / group * D, t1 - t0, row_stride, a->scale,
                         scores + head * len + t0 - first, D);
    }
    /* Softmax per head, in place; the normaliser is applied to the output at the end. */
    float inv_sum[heads];
    for (int64_t head = 0; head < heads; head++) {
        float *s = scores + head * len;
        if (a->softcap > 0.0f) softcap_scores(s, len, a->softcap);
        float m = -INFINITY;
        for (int64_t t = 0; t < len; t++) m = s[t] > m ? s[t] : m;
        vf vsum = {0};
        int64_t t = 0;
        for (; t + VL <= len; t += VL) {
            const vf e = vexp(*(vf *)(s + t) - m);
            *(vf *)(s + t) = e;
            vsum += e;
        }
        float sum = hsum(vsum);
        for (; t < len; t++) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        inv_sum[head] = 1.0f / sum;
    }
    /* Pass 2: acc = sum_t p_t v_t. */
    memset(acc, 0, (size_t)(heads * D) * sizeof(float));
    for (int64_t i = first_block; i < num_blocks; i++) {
        const int64_t t0 = i == first_block ? first : i * bs, t1 = ctx - i * bs < bs ? ctx : (i + 1) * bs;
        if (FP8) {
            const uint8_t *rows = v_bytes + (int64_t)table[i] * block_elems + (t0 - i * bs) * row_stride;
            for (int64_t kv = 0; kv < nh; kv++) {
                if (i + 1 < num_blocks)
                    prefetch_bytes(v_bytes + (int64_t)table[i + 1] * block_elems + kv * D, bs, row_stride, D);
                dequantize_rows(rows + kv * D, t1 - t0, row_stride, a->v_mult, block, D);
                for (int64_t head = kv * group; head < (kv + 1) * group; head++)
                    block_weighted_sum(scores + head * len + t0 - first, block, t1 - t0, D, acc + head * D, D);
            }
            continue;
        }
        const float *rows = v_rows + (int64_t)table[i] * block_elems + (t0 - i * bs) * row_stride;
        if (i + 1 < num_blocks) prefetch_rows(v_rows + (int64_t)table[i + 1] * block_elems, bs, row_stride, nh * D);
        for (int64_t head = 0; head < heads; head++)
            block_weighted_sum(scores + head * len + t0 - first, rows + head / group * D, t1 - t0, row_stride,
                               acc + head * D, D);
    }
    for (int64_t head = 0; head < heads; head++)
        for (int64_t d = 0; d < D; d++) out[head * D + d] = acc[head * D + d] * inv_sum[head];
}

typedef void (*item_fn)(const decode_args *, int64_t, int64_t, int64_t, float *, float *, float *);

#define DEFINE_ITEM(name, D, FP8)                                                                  \
    static void name(const decode_args *a, int64_t b, int64_t h0, int64_t nh, float *scores, float *acc, \
                     float *block) {                                                               \
        decode_item(a, b, h0, nh, scores, acc, block, D, FP8);                                     \
    }
DEFINE_ITEM(decode_item_64, 64, 0)
DEFINE_ITEM(decode_item_128, 128, 0)
DEFINE_ITEM(decode_item_any, a->head_dim, 0)
DEFINE_ITEM(decode_item_fp8_64, 64, 1)
DEFINE_ITEM(decode_item_fp8_128, 128, 1)
DEFINE_ITEM(decode_item_fp8_any, a->head_dim, 1)

/* Items [begin, end) counted from the longest context: the caller sorts decodes by context
 * length ascending, so the items are walked from the end and the long ones start first. An
 * item is a sequence's `heads_per_item` kv heads (all of them, or one). */
static void decode_range(void *ctx, int64_t begin, int64_t end) {
    decode_args *a = (decode_args *)ctx;
    const int64_t D = a->head_dim;
    const item_fn item = a->fp8 ? (D == 64 ? decode_item_fp8_64 : D == 128 ? decode_item_fp8_128 : decode_item_fp8_any)
                                : (D == 64 ? decode_item_64 : D == 128 ? decode_item_128 : decode_item_any);
    const int64_t nh = a->heads_per_item, items_per_seq = a->num_kv_heads / nh;
    const int64_t heads = nh * (a->num_heads / a->num_kv_heads);
    const int64_t block_elems = a->fp8 ? a->block_size * D : 0;
    for (int64_t i = begin; i < end; i++) {
        const int64_t b = a->num_seqs - 1 - i / items_per_seq, h0 = i % items_per_seq * nh;
        const int64_t keys = keys_seen(a->context_lens[b] > 0 ? a->context_lens[b] : 1, a->window);
        float *scores = malloc((size_t)(heads * (keys + D) + block_elems) * sizeof(float));
        if (scores == NULL) {
            __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
            return;
        }
        item(a, b, h0, nh, scores, scores + heads * keys, scores + heads * (keys + D));
        free(scores);
    }
}

/* Shares a's items out among the threads; fills in heads_per_item. */
static int run_decode(decode_args *a, int64_t num_threads) {
    int64_t keys = 0;
    for (int64_t b = 0; b < a->num_seqs; b++)
        keys += keys_seen(a->context_lens[b] > 0 ? a->context_lens[b] : 0, a->window);
    /* Handing work to the thread team costs microseconds: not worth it for a few keys. */
    if (keys * a->num_kv_heads * a->head_dim < (1 << 14)) num_threads = 1;
    a->heads_per_item = num_threads > 1 && a->num_seqs < 2 * num_threads ? 1 : a->num_kv_heads;
    parallel_for(decode_range, a, a->num_seqs * (a->num_kv_heads / a->heads_per_item), 1, num_threads);
    return a->failed;
}

/* window > 0: each sequence sees only its last `window` keys; softcap > 0: capped scores.
 * Returns 0 on success, nonzero if scratch memory could not be had. */
int stoke_paged_decode_attention_f32(
    const float *q, const float *k_cache, const float *v_cache, const int32_t *block_tables,
    const int32_t *context_lens, float *out, int64_t num_seqs, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t table_stride,
    int64_t q_stride_b, int64_t q_stride_h, float scale, int64_t window, float softcap,
    int64_t num_threads) {
    decode_args a = {q, k_cache, v_cache, block_tables, context_lens, out, num_seqs, num_heads,
                     num_kv_heads, head_dim, block_size, table_stride, q_stride_b, q_stride_h,
                     scale, window, softcap, 0, 0, 1.0f, 1.0f, 0};
    return run_decode(&a, num_threads);
}

/* The same over e4m3 caches (float8_e4m3fn bytes), each key read as byte * k_scale and each
 * value as byte * v_scale, rounded once to fp32. */
int stoke_paged_decode_attention_fp8(
    const float *q, const uint8_t *k_cache, const uint8_t *v_cache, const int32_t *block_tables,
    const int32_t *context_lens, float *out, int64_t num_seqs, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t table_stride,
    int64_t q_stride_b, int64_t q_stride_h, float scale, int64_t window, float softcap,
    float k_scale, float v_scale, int64_t num_threads) {
    decode_args a = {q, k_cache, v_cache, block_tables, context_lens, out, num_seqs, num_heads,
                     num_kv_heads, head_dim, block_size, table_stride, q_stride_b, q_stride_h,
                     scale, window, softcap, 0, 1, k_scale * 256.0f, v_scale * 256.0f, 0};
    return run_decode(&a, num_threads);
}
