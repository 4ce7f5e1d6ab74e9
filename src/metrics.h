/* Metrics: per-thread series, summed when scraped (Prometheus text).
 *
 * Each worker thread owns a table of series and is its only writer: an
 * increment is a plain add published with a relaxed store, no lock and no
 * atomic read-modify-write on the request path. The table's lock is taken
 * by its owner only to add a new series (rare: once per route, status
 * class, endpoint, ...) and by the scraper while it reads. Threads that are
 * not workers (the admin thread, a module's fetcher thread) share one
 * table whose every update takes the lock.
 *
 * A series is a metric name plus up to three label pairs; names and values
 * are copied when the series is created. Label values are escaped when
 * the exposition is written. */
#ifndef PORTICO_METRICS_H
#define PORTICO_METRICS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define METRICS_BUCKETS 12 /* the last is +Inf */

enum metric_kind { METRIC_COUNTER, METRIC_HISTOGRAM };

struct metric_hist {
    uint64_t bucket[METRICS_BUCKETS]; /* non-cumulative; summed at scrape */
    uint64_t count;
    uint64_t sum_us;
};

struct metric_series;

struct metrics {
    pthread_mutex_t lock;
    int shared;                   /* the non-worker table: updates lock */
    struct metric_series **slot;  /* open addressing */
    size_t cap, n;
};

void metrics_init(struct metrics *m, int shared);
void metrics_free(struct metrics *m);

/* The calling thread's table: a worker sets its own at start; others get
 * the shared one. */
void metrics_set_thread(struct metrics *m);
struct metrics *metrics_thread(void);

/* Add n to a counter; labels are (k1, v1), (k2, v2), (k3, v3), NULL ends. */
void metrics_add(struct metrics *m, const char *name, uint64_t n, const char *k1, const char *v1,
                 const char *k2, const char *v2, const char *k3, const char *v3);
/* Observe a duration in a histogram (seconds buckets). */
void metrics_observe_us(struct metrics *m, const char *name, uint64_t us, const char *k1,
                        const char *v1, const char *k2, const char *v2);

/* Every table a scrape must read: workers register theirs. */
void metrics_register(struct metrics *m);
void metrics_unregister(struct metrics *m);

/* A series kept by its caller, for the hot path: found (or created) once
 * with its labels, then updated without hashing a string. Only for a
 * worker's own table, from its thread; valid while the table lives. */
struct metric_series *metrics_counter(struct metrics *m, const char *name, const char *k1,
                                      const char *v1, const char *k2, const char *v2,
                                      const char *k3, const char *v3);
struct metric_series *metrics_histogram(struct metrics *m, const char *name, const char *k1,
                                        const char *v1, const char *k2, const char *v2);
void metrics_series_add(struct metric_series *s, uint64_t n);
void metrics_series_observe_us(struct metric_series *s, uint64_t us);

/* The sum of a counter's series whose labels include (k1, v1) and, when
 * k2 is not NULL, (k2, v2), over every table. */
uint64_t metrics_sum(const char *name, const char *k1, const char *v1, const char *k2,
                     const char *v2);

/* Process-wide values the scrape adds (set by main and workers). */
struct metrics_globals {
    uint64_t reloads_ok, reloads_failed; /* atomics */
    int draining;                        /* atomic */
};
extern struct metrics_globals metrics_globals;

/* The whole exposition, summed over every registered table, plus the
 * gauges extra() appends (connections, build info); malloc'd, *len set. */
char *metrics_render(size_t *len, void (*extra)(void *arg, char **buf, size_t *len, size_t *cap),
                     void *arg);
/* Append printf-style text to a growing buffer (for extra()). */
void metrics_printf(char **buf, size_t *len, size_t *cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
