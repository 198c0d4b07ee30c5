/* parallel_for over [0, n) in chunks taken from a shared counter by num_threads threads (the
 * caller's included). Threads are started per call: tens of microseconds, so callers ask for
 * one thread when the work is small. No thread pool, so nothing spins between calls while
 * torch's own threads run the matmuls. */
#ifndef STOKE_PARALLEL_H
#define STOKE_PARALLEL_H

#include <pthread.h>
#include <stdint.h>

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t n, chunk, next;
} parallel_job;

static void *parallel_worker(void *arg) {
    parallel_job *job = (parallel_job *)arg;
    for (;;) {
        const int64_t begin = __atomic_fetch_add(&job->next, job->chunk, __ATOMIC_RELAXED);
        if (begin >= job->n) break;
        job->fn(job->ctx, begin, begin + job->chunk < job->n ? begin + job->chunk : job->n);
    }
    return NULL;
}

static void parallel_for(range_fn fn, void *ctx, int64_t n, int64_t chunk, int64_t num_threads) {
    parallel_job job = {fn, ctx, n, chunk > 0 ? chunk : 1, 0};
    const int64_t chunks = (n + job.chunk - 1) / job.chunk;
    if (num_threads > chunks) num_threads = chunks;
    if (num_threads < 1) num_threads = 1;
    pthread_t threads[num_threads];
    int64_t started = 0;
    for (; started < num_threads - 1; started++)
        if (pthread_create(&threads[started], NULL, parallel_worker, &job) != 0) break;
    parallel_worker(&job); /* whatever threads could not start, this one covers */
    for (int64_t i = 0; i < started; i++) pthread_join(threads[i], NULL);
}

#endif
