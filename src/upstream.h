/* Upstream connections and the per-worker keep-alive pools.
 *
 * An upconn is one TCP connection to one endpoint. It is owned either by
 * a pool (idle) or by a client connection (active); never both. While
 * idle, any event on it (the upstream closed it, or sent bytes nobody
 * asked for) closes it at once, so a pooled connection that the upstream
 * closed is never handed out for a request.
 *
 * States:
 *   CONNECTING --writable, SO_ERROR 0 [, TLS handshake done]--> ACTIVE
 *   ACTIVE --upconn_release--> IDLE
 *   IDLE --upconn_take--> ACTIVE;  any --upconn_close--> freed
 * Thread: a pool and its upconns belong to one worker. */
#ifndef PORTICO_UPSTREAM_H
#define PORTICO_UPSTREAM_H

#include <event2/event.h>
#include <event2/event_struct.h>
#include <stdint.h>
#include "buf.h"
#include "config.h"
#include "tls.h"

struct worker;
struct conn;
struct pool;
struct h2up;
struct metric_series;

enum upconn_state { UP_CONNECTING, UP_ACTIVE, UP_IDLE };

struct upconn {
    int fd;
    enum upconn_state state;
    struct event ev;            /* EV_READ|EV_WRITE|EV_ET|EV_PERSIST, added once */
    unsigned readable : 1, writable : 1, rdhup : 1;
    unsigned reused : 1;        /* served a request before this one */
    SSL *ssl;                   /* TLS upstream: set once TCP connects */
    unsigned tls_hs_ww : 1;     /* the handshake waits for writability */
    unsigned tls_rw : 1, tls_wr : 1; /* a read waits to write, a write to read */
    struct buf in, out;         /* out: request head and framing copies */
    struct buf *span_src;       /* after out: the first span_len bytes of *span_src */
    size_t span_len;
    struct pool *pool;
    struct conn *owner;         /* the client connection while ACTIVE */
    int requests;               /* requests sent on this connection */
    uint32_t addr_gen;          /* of a host name endpoint's address (resil.h) */
    uint64_t idle_since_ms;
    struct upconn *prev, *next; /* pool idle list */
    struct h2up *h2;            /* an HTTP/2 upstream's session (h2up.h), made on first use */
};

/* One pool per (upstream, endpoint) per worker. */
struct pool {
    struct worker *w;
    const struct config_upstream *up;
    const struct config_endpoint *ep;
    struct upconn *idle;        /* most recently used first */
    int nidle;
    void *tls_session;          /* TLS upstream: the session to resume (tls.h) */
    struct metric_series *req_series[6], *duration_series; /* request_metrics, lazily */
};

/* Take an idle connection, or start a new one (state CONNECTING).
 * Returns NULL only when socket()/connect() fail at once; errno is set. */
struct upconn *upconn_get(struct pool *p, struct conn *owner, size_t in_cap, size_t out_cap);
/* Give an ACTIVE connection back to its pool; closes it instead when the
 * pool is full or the connection reached keepalive_requests. */
void upconn_release(struct upconn *u);
/* Read from the connection (TLS or plain) into dst. Returns the bytes
 * read, 0 at EOF, or -1 with errno EAGAIN (nothing now), EINTR (again) or
 * an error (a TLS failure is ECONNRESET). Keeps u->readable as the
 * edge-triggered events need: cleared once the socket has nothing more. */
ssize_t upconn_read(struct upconn *u, char *dst, size_t space);
/* Write iov (TLS or plain) to the connection. Returns the bytes written, or
 * -1 with errno EAGAIN (nothing taken now), EINTR (again) or an error (a
 * TLS failure is EPIPE). Clears u->writable when not all was taken: the
 * rest waits for the next edge. */
ssize_t upconn_writev(struct upconn *u, const struct iovec *iov, int n);
/* Close and free (any state). */
void upconn_close(struct upconn *u);
/* Close idle connections older than the upstream's keepalive_timeout_ms. */
void pool_sweep(struct pool *p, uint64_t now_ms);
void pool_close_all(struct pool *p);
/* Move from's idle connections to an equivalent pool of a newer config
 * (a reload), up to to's keepalive bound; the rest are closed. */
void pool_move_idle(struct pool *to, struct pool *from);

/* Called by the event callback of an ACTIVE/CONNECTING upconn: defined
 * by the client connection code. */
void conn_on_upstream_event(struct conn *c, struct upconn *u, short what);

#endif
