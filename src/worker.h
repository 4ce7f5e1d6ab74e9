/* Worker threads. Each has its own event base, its own SO_REUSEPORT
 * listening sockets, its own upstream pools and its own access-log
 * buffer: a request lives and dies on one worker, with no locks on its
 * path. The main thread talks to a worker only through its control pipe. */
#ifndef PORTICO_WORKER_H
#define PORTICO_WORKER_H

#include <event2/event.h>
#include <event2/event_struct.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include "buf.h"
#include "config.h"
#include "metrics.h"

struct conn;
struct pool;

struct worker_listener {
    struct worker *w;
    int fd;
    struct event ev;
    const struct config_listener *cfg;
};

/* The upstream pools of one config snapshot on one worker. A connection
 * uses the set (and its config) of the worker at the start of its current
 * request, so a reload never changes a request in flight; a set replaced
 * by a reload is freed, with its config reference, once no connection
 * uses it. */
/* A route's request series on this worker's table (request_metrics). */
struct route_series {
    struct metric_series *req[8][6]; /* [method class][status class] */
    struct metric_series *duration;
};

struct poolset {
    struct config *cfg;           /* one reference */
    struct route_series *route_series; /* [route index], [nroutes] for no route; lazily */
    struct pool **pools;          /* pools[upstream index][endpoint index] */
    uint32_t *rr;                 /* round-robin position per upstream */
    int users;                    /* connections on this set */
    struct poolset *next;         /* the worker's retired sets */
};

/* A reload handed to a worker by the main thread (see worker_reload). */
struct worker_reload_msg {
    struct config *cfg;           /* one reference, now the worker's */
    int *listen_fds;              /* per cfg listener: a new socket, or -1 to keep the old one */
};

struct worker {
    int id;
    pthread_t thread;
    struct event_base *base;
    struct config *cfg;           /* current: ps->cfg */
    struct poolset *ps;           /* current */
    struct poolset *retired;      /* replaced, still used by connections */
    struct worker_listener *listeners;
    size_t nlisteners;
    struct worker_reload_msg *pending; /* from main, taken by the worker */
    unsigned reload_gen;          /* reloads applied (main waits on it) */
    struct conn *conns;           /* every open client connection */
    int nconns;
    int draining;
    int ctrl_fd[2];               /* main writes commands to [1] */
    struct event ctrl_ev, tick_ev;
    struct buf log;               /* access-log lines waiting to be written */
    int log_fd;                   /* -1 when off */
    char *log_path;               /* what log_fd is open on ("-" for stdout) */
    struct event log_ev;          /* flushes the log shortly after the first line */
    int log_ev_pending;
    char date[40];                /* "Date: ...\r\n"-ready IMF-fixdate */
    time_t date_sec;
    volatile int done;            /* set when the loop has exited */
    struct metrics metrics;       /* this worker's series (metrics.h) */
    uint64_t warn_at_ms;          /* last upstream warning (one per second) */
    uint64_t rng;                 /* xorshift state: log sampling */
    unsigned warn_suppressed;
};

/* Socket events this thread has handled: busy polling watches it. */
extern __thread unsigned worker_io_events;

static inline struct event_base *worker_base(struct worker *w) { return w->base; }
static inline int worker_draining(struct worker *w) { return w->draining; }

/* The monotonic clock as the current socket event sees it, in ns; 0
 * outside one. A request asks the time about twenty times (deadlines,
 * timings, pools) and each read costs about 40 ns here, so the callbacks
 * that handle socket events read it once (worker_clock_enter) and the work
 * of that event shares it, as nginx and HAProxy share one per loop turn. */
extern __thread uint64_t worker_clock_ns;

static inline uint64_t worker_clock_read(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Returns what worker_clock_leave takes. A callback run from inside
 * another keeps the outer one's time, so the clock a request sees never
 * goes back. */
static inline int worker_clock_enter(void)
{
    if (worker_clock_ns)
        return 0;
    worker_clock_ns = worker_clock_read();
    return 1;
}

static inline void worker_clock_leave(int entered)
{
    if (entered)
        worker_clock_ns = 0;
}

static inline uint64_t worker_now_ns(void)
{
    return worker_clock_ns ? worker_clock_ns : worker_clock_read();
}

static inline uint64_t worker_now_ms(struct worker *w)
{
    (void)w;
    return worker_now_ns() / 1000000u;
}

static inline uint64_t now_us(void) { return worker_now_ns() / 1000u; }

/* A uniform number in [0, 1) from the worker's own generator (not for
 * anything secret). */
static inline double worker_random(struct worker *w)
{
    uint64_t x = w->rng ? w->rng : 0x9e3779b97f4a7c15ULL ^ (uint64_t)(uintptr_t)w;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    w->rng = x;
    return (double)(x >> 11) / 9007199254740992.0;
}

/* The current IMF-fixdate, e.g. "Thu, 26 Nov 2026 07:07:06 GMT". */
const char *worker_date(struct worker *w);

/* Create a worker with its listening sockets already bound (fds owned by
 * the worker from now on). Returns NULL with a message in err. */
struct worker *worker_new(int id, struct config *cfg, const int *listen_fds, char *err, size_t errlen);
int worker_start(struct worker *w);
/* Ask a worker (from another thread) to drain: stop accepting, finish
 * in-flight requests, then leave its loop. */
void worker_request_drain(struct worker *w);
/* Reopen the access log file (SIGUSR1, after logrotate moved it). */
void worker_reopen_log(struct worker *w);
/* Ask it to stop at once (drain timeout passed). */
void worker_request_stop(struct worker *w);
void worker_free(struct worker *w);

/* Hand a new config (one reference, given to the worker) and listening
 * sockets to a running worker; it switches between requests. Returns at
 * once; worker_reload_done tells when it has. listen_fds is copied. */
void worker_reload(struct worker *w, struct config *cfg, const int *listen_fds);
int worker_reload_done(struct worker *w, unsigned gen);

/* A connection takes the worker's current set / gives its set back. */
struct poolset *poolset_take(struct worker *w);
void poolset_put(struct worker *w, struct poolset *ps);

/* Client connection bookkeeping, called by conn.c. */
void worker_conn_closed(struct worker *w);
/* Append one access-log line (without newline); flushed soon after. */
void worker_log_line(struct worker *w, const char *line, size_t len);

/* Open a listening socket for a listener (SO_REUSEPORT), for main. */
int worker_listen_socket(const struct config_listener *l, char *err, size_t errlen);

/* Process-wide count of client connections, for limits.max_connections. */
extern int worker_total_conns;

#endif
