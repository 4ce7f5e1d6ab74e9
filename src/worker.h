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

struct conn;
struct pool;

struct worker_listener {
    struct worker *w;
    int fd;
    struct event ev;
    const struct config_listener *cfg;
};

struct worker {
    int id;
    pthread_t thread;
    struct event_base *base;
    struct config *cfg;
    struct worker_listener *listeners;
    size_t nlisteners;
    struct pool **pools;          /* pools[upstream index][endpoint index] */
    uint32_t *rr;                 /* round-robin position per upstream */
    struct conn *conns;           /* every open client connection */
    int nconns;
    int draining;
    int ctrl_fd[2];               /* main writes commands to [1] */
    struct event ctrl_ev, tick_ev;
    struct buf log;               /* access-log lines waiting to be written */
    int log_fd;                   /* -1 when off */
    struct event log_ev;          /* flushes the log shortly after the first line */
    int log_ev_pending;
    char date[40];                /* "Date: ...\r\n"-ready IMF-fixdate */
    time_t date_sec;
    volatile int done;            /* set when the loop has exited */
};

static inline struct event_base *worker_base(struct worker *w) { return w->base; }
static inline int worker_draining(struct worker *w) { return w->draining; }

static inline uint64_t worker_now_ms(struct worker *w)
{
    (void)w;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static inline uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
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
/* Ask it to stop at once (drain timeout passed). */
void worker_request_stop(struct worker *w);
void worker_free(struct worker *w);

/* Client connection bookkeeping, called by conn.c. */
void worker_conn_closed(struct worker *w);
/* Append one access-log line (without newline); flushed soon after. */
void worker_log_line(struct worker *w, const char *line, size_t len);

/* Open a listening socket for a listener (SO_REUSEPORT), for main. */
int worker_listen_socket(const struct config_listener *l, char *err, size_t errlen);

/* Process-wide count of client connections, for limits.max_connections. */
extern int worker_total_conns;

#endif
