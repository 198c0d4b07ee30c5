/* parallel_for over [0, n) in chunks handed out dynamically to num_threads OpenMP threads.
 *
 * Loaded into a process that has torch, the library binds to the OpenMP runtime torch already
 * loaded (the same libgomp.so.1 soname), so these loops run on torch's own thread team: no
 * thread start per call, and no second pool spinning against torch's matmul threads. */
#ifndef STOKE_PARALLEL_H
#define STOKE_PARALLEL_H

#include <stdint.h>

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

static void parallel_for(range_fn fn, void *ctx, int64_t n, int64_t chunk, int64_t num_threads) {
    if (chunk < 1) chunk = 1;
    const int64_t chunks = (n + chunk - 1) / chunk;
    if (num_threads > chunks) num_threads = chunks;
    if (num_threads <= 1) {
        if (n > 0) fn(ctx, 0, n);
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t c = 0; c < chunks; c++) fn(ctx, c * chunk, (c + 1) * chunk < n ? (c + 1) * chunk : n);
}

#endif
