/* Client connections: reading request heads, local answers, and the
 * proxied exchange (request body to the upstream, response back). The
 * state diagram is in conn.h. */
#include "conn.h"
#include "metrics.h"
#include "accesslog.h"
#include "log.h"
#include "router.h"
#include "tunnel.h"
#include "h2.h"
#include "h2up.h"
#include "upstream.h"
#include "uri.h"
#include "worker.h"

#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define LINGER_MS 2000
#define LINGER_MAX_BYTES (1024 * 1024)
/* Start the next pipelined request only when the previous answers have
 * mostly left: bounds the memory a client that does not read can pin. */
#define OUT_HIGH_WATER 16384

static void conn_pump(struct conn *c);
static void request_reset(struct conn *c);

static const struct config_limits *limits(const struct conn *c) { return &c->ps->cfg->limits; }

static size_t in_cap(const struct config_limits *l)
{
    size_t cap = l->max_header_bytes + 1024;
    return cap < 16384 ? 16384 : cap;
}

/* An upstream connection's read buffer: a response head at the limit,
 * and a 64 KiB body with its head in one read, so such a response costs
 * one read and one write, and wakes the client once. */
static size_t up_in_cap(const struct config_limits *l) { return in_cap(l) + 65536; }

static size_t out_cap(const struct config_limits *l)
{
    size_t cap = 2 * l->max_header_bytes + 4096;
    return cap < 65536 ? 65536 : cap;
}

/* ---- events and timers ------------------------------------------------ */

static void on_client_event(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    int entered = worker_clock_enter();
    worker_io_events++;
    if (what & (EV_READ | EV_CLOSED)) {
        c->readable = 1;
        if (c->tls_wr)
            c->writable = 1;
    }
    /* The peer's FIN may come in the same segment as its last bytes: then
     * no further edge arrives, so keep reading until read() says EOF. */
    if (what & EV_CLOSED)
        c->rdhup = 1;
    if (what & EV_WRITE) {
        c->writable = 1;
        if (c->tls_rw)
            c->readable = 1;
    }
    conn_pump(c);
    worker_clock_leave(entered);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    int entered = worker_clock_enter();
    c->timer_at_ms = 0;
    conn_pump(c);
    worker_clock_leave(entered);
}

static void on_resume(evutil_socket_t fd, short what, void *arg)
{
    int entered = worker_clock_enter();
    conn_pump(arg);
    worker_clock_leave(entered);
}

void conn_on_upstream_event(struct conn *c, struct upconn *u, short what)
{
    conn_pump(c);
}

/* Whether the peer is a trusted proxy, under the connection's config. */
static void conn_check_trusted(struct conn *c)
{
    const struct config *cfg = c->ps->cfg;
    c->trusted = 0;
    for (size_t i = 0; i < cfg->ntrusted_proxies; i++)
        if (cidr_match(&cfg->trusted_proxies[i], (const struct sockaddr *)&c->peer)) {
            c->trusted = 1;
            break;
        }
}

/* A request starts: it runs on the worker's current config (a reload
 * since the previous request on this connection takes effect here). */
static void conn_follow_reload(struct conn *c)
{
    if (c->ps == c->w->ps || c->up)
        return;
    struct poolset *old = c->ps;
    c->ps = poolset_take(c->w);
    poolset_put(c->w, old);
    conn_check_trusted(c);
}

void conn_accept(struct worker *w, const struct config_listener *lc, int fd,
                 const struct sockaddr *sa, socklen_t salen)
{
    struct conn *c = xcalloc(1, sizeof(*c));
    c->w = w;
    c->ps = poolset_take(w);
    /* lc lives in the config of the accept; a reload may move the
     * connection's requests to a newer config, so keep that one alive. */
    c->lc = lc;
    c->lc_cfg = config_ref(c->ps->cfg);
    const struct config_limits *l = &c->ps->cfg->limits;
    c->fd = fd;
    memcpy(&c->peer, sa, salen < sizeof(c->peer) ? salen : sizeof(c->peer)); /* TCP: in or in6 */
    addr_format_ip(sa, c->peer_ip, sizeof(c->peer_ip));
    conn_check_trusted(c);
    buf_init(&c->in, in_cap(l));
    buf_init(&c->out, out_cap(l));
    arena_init(&c->arena, 8192);
    c->req.arena = &c->arena;
    c->state = CS_HEAD;
    c->writable = 1;
    c->readable = 1; /* data may already be waiting: try a read at once */
    c->idle_since_ms = worker_now_ms(w);
    c->last_write_ms = c->idle_since_ms;
    c->accept_ms = c->idle_since_ms;
    if (lc->tls) {
        c->ssl = tls_server_conn(lc->tls, fd);
        c->tls_hs = 1;
        if (!c->ssl) {
            log_error("client %s: cannot create a TLS session", c->peer_ip);
            c->dead = 1;
        }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    event_assign(&c->ev, w->base, fd, EV_READ | EV_WRITE | EV_CLOSED | EV_ET | EV_PERSIST, on_client_event, c);
    event_assign(&c->timer, w->base, -1, 0, on_timer, c);
    event_add(&c->ev, NULL);
    metrics_add(&w->metrics, "portico_connections_accepted_total", 1, NULL, NULL, NULL, NULL, NULL,
                NULL);
    c->next = w->conns;
    if (w->conns)
        w->conns->prev = c;
    w->conns = c;
    w->nconns++;
    request_reset(c);
    conn_pump(c);
}

static void conn_free(struct conn *c)
{
    struct worker *w = c->w;
    if (c->h2)
        h2_free(c); /* its streams' conns first: they borrow c->ssl */
    if (c->up) {
        upconn_close(c->up);
        c->up = NULL;
    }
    resil_req_end(&c->req.resil);
    event_del(&c->ev);
    event_del(&c->timer);
    if (c->resume_ev)
        event_free(c->resume_ev);
    free(c->tls_subject);
    free(c->tls_fp);
    arena_destroy(&c->arena);
    buf_free(&c->in);
    buf_free(&c->out);
    if (c->h2s) {
        h2_stream_gone(c);
        poolset_put(w, c->ps);
        config_unref(c->lc_cfg);
        free(c);
        return;
    }
    if (c->ssl)
        tls_close(c->ssl);
    close(c->fd);
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    poolset_put(w, c->ps);
    config_unref(c->lc_cfg);
    free(c);
    worker_conn_closed(w);
}

/* ---- output ----------------------------------------------------------- */

static size_t out_pending(const struct conn *c) { return buf_len(&c->out) + c->sp_len; }

static const char *span_ptr(const char *sp, const struct buf *src)
{
    return src ? buf_head(src) : sp;
}

/* Write c->out then the span. Returns 1 on progress. */
static int client_flush(struct conn *c)
{
    if (!c->writable || c->dead || out_pending(c) == 0)
        return 0;
    struct iovec iov[2];
    int n = 0;
    if (buf_len(&c->out)) {
        iov[n].iov_base = buf_head(&c->out);
        iov[n++].iov_len = buf_len(&c->out);
    }
    if (c->sp_len) {
        iov[n].iov_base = (void *)span_ptr(c->sp, c->sp_src);
        iov[n++].iov_len = c->sp_len;
    }
    size_t total = out_pending(c);
    /* A response head whose small, length-framed body has not arrived yet
     * (origins often send head and body in two segments) is held back by
     * the kernel until the body follows, so the client gets one segment
     * instead of two; the kernel sends it anyway after 200 ms. */
    int more = c->req.rs == RS_BODY_LENGTH && c->sp_len == 0 && c->req.rs_left <= 65536;
    ssize_t wr;
    if (c->h2s) {
        wr = h2_stream_write(c, iov, n);
        if (wr == 0) {
            c->writable = 0;
            return 0;
        }
        if (wr < 0)
            errno = EPIPE; /* the client reset the stream */
    } else if (c->ssl) {
        int stop;
        wr = tls_writev(c->ssl, iov, n, &stop);
        c->tls_wr = stop == TLS_WANT_READ;
        if (stop == TLS_FATAL) {
            log_debug("client %s: TLS write: %s", c->peer_ip, tls_last_error(c->ssl));
            c->dead = 1;
            if (c->req.status == 0 || c->state == CS_REQUEST)
                c->req.status = c->req.status ? c->req.status : 499;
            return 1;
        }
        if (stop)
            c->writable = 0;
        if (wr == 0)
            return 0;
    } else {
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        wr = sendmsg(c->fd, &mh, MSG_NOSIGNAL | (more ? MSG_MORE : 0));
    }
    if (wr < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c->writable = 0;
            return 0;
        }
        if (errno == EINTR)
            return 1;
        /* The client is gone: nothing more can be delivered. */
        c->dead = 1;
        if (c->req.status == 0 || c->state == CS_REQUEST)
            c->req.status = c->req.status ? c->req.status : 499;
        return 1;
    }
    size_t w = (size_t)wr;
    c->req.bytes_out += w;
    c->last_write_ms = worker_now_ms(c->w);
    size_t from_out = w < buf_len(&c->out) ? w : buf_len(&c->out);
    buf_consume(&c->out, from_out);
    w -= from_out;
    if (w) {
        if (c->sp_src)
            buf_consume(c->sp_src, w);
        else
            c->sp += w;
        c->sp_len -= w;
    }
    if (c->sp_len == 0) {
        c->sp = NULL;
        c->sp_src = NULL;
    }
    if ((size_t)wr < total)
        c->writable = 0;
    return 1;
}

/* ---- local answers ------------------------------------------------------ */

static int method_is_head(const struct conn *c) { return c->req.head.method == HTTP_M_HEAD; }

/* Queue the head of a local answer: ours, then the filters' edits. */
static void local_head(struct conn *c, int status, const char *ctype, size_t blen, const char *extra)
{
    struct request *r = &c->req;
    char head[1024];
    if (!r->keepalive)
        c->close_after = 1;
    const char *conn_hdr = "";
    if (c->close_after)
        conn_hdr = "Connection: close\r\n";
    else if (r->head.minor == 0)
        conn_hdr = "Connection: keep-alive\r\n";
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s%s",
                     status, http_status_reason(status), worker_date(c->w), ctype, blen,
                     extra ? extra : "", conn_hdr);
    if (n < 0 || (size_t)n >= sizeof(head))
        die("local response head too long");
    buf_append(&c->out, head, (size_t)n);
    if (r->resp_edits)
        filter_edits_emit(r->resp_edits, &c->out);
    buf_append(&c->out, "\r\n", 2);
    r->status = status;
    r->resp_started = 1;
    r->rs = RS_LOCAL;
    c->state = CS_REQUEST;
}

/* gRPC status codes for our own errors (grpc/doc/http-grpc-status-mapping,
 * with 429 and 413 as RESOURCE_EXHAUSTED, which is what they mean). */
static int grpc_status_of(int http)
{
    switch (http) {
    case 400: return 13; /* INTERNAL */
    case 401: return 16; /* UNAUTHENTICATED */
    case 403: return 7;  /* PERMISSION_DENIED */
    case 404: return 12; /* UNIMPLEMENTED */
    case 408: case 504: return 4; /* DEADLINE_EXCEEDED */
    case 413: case 429: return 8; /* RESOURCE_EXHAUSTED */
    case 502: case 503: return 14; /* UNAVAILABLE */
    default: return 2; /* UNKNOWN */
    }
}

/* Write the local answer in r->local, after the response hooks of the
 * filters that let the request through (they may edit it, or replace it
 * by answering again). The body must outlive the request's answer (config
 * or arena memory): when large it is written from there without a copy. */
static void local_commit(struct conn *c)
{
    struct request *r = &c->req;
    if (r->chain_ok)
        filter_run_response(c);
    /* A body we have not read all of cannot be told apart from a next
     * request: answering before it ends the connection. */
    if (r->has_body && r->rb != RB_DONE) {
        r->keepalive = 0;
        c->linger_needed = 1;
    }
    struct local_answer a = r->local;
    if (r->grpc && a.status >= 400) {
        /* A gRPC client reads errors from grpc-status, not from the HTTP
         * status: answer "Trailers-Only" (gRPC's HTTP/2 protocol). */
        size_t el = a.extra ? strlen(a.extra) : 0;
        char *extra = arena_alloc(&c->arena, el + 96);
        snprintf(extra, el + 96, "%sgrpc-status: %d\r\ngrpc-message: %s\r\n", a.extra ? a.extra : "",
                 grpc_status_of(a.status), http_status_reason(a.status));
        local_head(c, 200, "application/grpc", 0, extra);
        r->status = a.status; /* logs and metrics keep what went wrong */
        return;
    }
    local_head(c, a.status, a.ctype, a.len, a.extra);
    if (method_is_head(c) || !a.len)
        return;
    if (a.len <= 4096 && buf_can_append(&c->out, a.len)) {
        buf_append(&c->out, a.body, a.len);
    } else {
        c->sp = a.body;
        c->sp_src = NULL;
        c->sp_len = a.len;
    }
}

void conn_local_answer(struct conn *c, int status, const char *ctype, const char *body,
                       size_t len, const char *extra)
{
    struct request *r = &c->req;
    r->local = (struct local_answer){ 1, status, ctype ? ctype : "application/json", body, len, extra };
    if (!r->deferring)
        local_commit(c);
}

static void respond(struct conn *c, int status, const char *ctype, const char *body, size_t len,
                    const char *extra)
{
    conn_local_answer(c, status, ctype, body, len, extra);
}

/* A JSON error answer. Answers given while a request body may still be
 * on its way end the connection: what follows cannot be trusted. */
static void respond_error(struct conn *c, int status, const char *extra)
{
    struct request *r = &c->req;
    char body[160];
    int n = snprintf(body, sizeof(body), "{\"error\":\"%s\",\"status\":%d}\n",
                     http_status_reason(status), status);
    if (!r->keepalive)
        c->linger_needed = 1;
    conn_local_answer(c, status, "application/json", arena_strndup(&c->arena, body, (size_t)n),
                      (size_t)n, extra ? arena_strndup(&c->arena, extra, strlen(extra)) : NULL);
}

static void on_resume(evutil_socket_t fd, short what, void *arg);

void conn_schedule(struct conn *c)
{
    if (!c->resume_ev && !(c->resume_ev = event_new(c->w->base, -1, 0, on_resume, c)))
        die("out of memory (event_new)");
    event_active(c->resume_ev, EV_TIMEOUT, 1);
}

/* ---- request lifecycle ------------------------------------------------ */

static void request_reset(struct conn *c)
{
    struct request *r = &c->req;
    resil_req_end(&r->resil);
    arena_reset(&c->arena);
    memset(r, 0, sizeof(*r));
    r->arena = &c->arena;
    r->conn = c;
    r->head.max_headers_cap = limits(c)->max_headers;
    r->head.headers = arena_alloc(&c->arena, sizeof(struct http_header) * r->head.max_headers_cap);
    c->scanned = 0;
    c->head_start_ms = 0;
}

/* Method classes of portico_requests_total, in route_series order. */
static const char *const method_names[8] = { "GET",   "HEAD",    "POST",  "PUT",
                                             "DELETE", "PATCH", "OPTIONS", "other" };

static int method_class(const struct request *r)
{
    if (!r->method)
        return 7;
    switch (r->head.method) {
    case HTTP_M_GET: return 0;
    case HTTP_M_HEAD: return 1;
    case HTTP_M_POST: return 2;
    case HTTP_M_PUT: return 3;
    case HTTP_M_DELETE: return 4;
    case HTTP_M_PATCH: return 5;
    case HTTP_M_OPTIONS: return 6;
    default: return 7;
    }
}

static const char *const status_names[6] = { "0xx", "1xx", "2xx", "3xx", "4xx", "5xx" };

static int status_class(int status) { return status >= 100 && status < 600 ? status / 100 : 0; }

/* Per-request series on the worker's own table (no lock, see metrics.h),
 * found once per route, method and status class, then kept in the
 * worker's set for this configuration: no string hashing per request. */
static void request_metrics(struct conn *c, uint64_t duration_us)
{
    struct request *r = &c->req;
    struct metrics *m = &c->w->metrics;
    struct poolset *ps = c->ps;
    const struct config *cfg = ps->cfg;
    if (!ps->route_series)
        ps->route_series = xcalloc(cfg->nroutes + 1, sizeof(*ps->route_series));
    /* A route of another configuration (a reload between the request's
     * start and its end) is not in this set: look it up by name. */
    size_t ri = r->route && r->route->index < cfg->nroutes && cfg->routes[r->route->index] == r->route
                    ? r->route->index
                    : cfg->nroutes;
    const char *route = r->route ? r->route->name : "";
    struct route_series *rs = &ps->route_series[ri];
    int mi = method_class(r), sc = status_class(r->status);
    if (ri == cfg->nroutes && r->route) {
        metrics_add(m, "portico_requests_total", 1, "route", route, "method", method_names[mi],
                    "code", status_names[sc]);
        if (r->status != 101)
            metrics_observe_us(m, "portico_request_duration_seconds", duration_us, "route", route,
                               NULL, NULL);
    } else {
        if (!rs->req[mi][sc])
            rs->req[mi][sc] = metrics_counter(m, "portico_requests_total", "route", route, "method",
                                              method_names[mi], "code", status_names[sc]);
        metrics_series_add(rs->req[mi][sc], 1);
        /* A tunnel's life is not a request's latency (it has its own series). */
        if (r->status != 101) {
            if (!rs->duration)
                rs->duration =
                    metrics_histogram(m, "portico_request_duration_seconds", "route", route, NULL, NULL);
            metrics_series_observe_us(rs->duration, duration_us);
        }
    }
    if (r->up_start_us && r->ep && r->resp.status && r->route && r->route->upstream) {
        const struct config_upstream *u = r->route->upstream;
        uint64_t us = (r->up_end_us ? r->up_end_us : now_us()) - r->up_start_us;
        int uc = status_class(r->resp.status);
        size_t ei = (size_t)(r->ep - u->endpoints);
        struct pool *p = u->index < cfg->nupstreams && &cfg->upstreams[u->index] == u &&
                                 ei < u->nendpoints
                             ? &ps->pools[u->index][ei]
                             : NULL;
        if (!p) {
            metrics_add(m, "portico_upstream_requests_total", 1, "upstream", u->name, "endpoint",
                        r->ep->address, "code", status_names[uc]);
            metrics_observe_us(m, "portico_upstream_duration_seconds", us, "upstream", u->name, NULL,
                               NULL);
            return;
        }
        if (!p->req_series[uc])
            p->req_series[uc] = metrics_counter(m, "portico_upstream_requests_total", "upstream",
                                                u->name, "endpoint", r->ep->address, "code",
                                                status_names[uc]);
        metrics_series_add(p->req_series[uc], 1);
        if (!p->duration_series)
            p->duration_series =
                metrics_histogram(m, "portico_upstream_duration_seconds", "upstream", u->name, NULL, NULL);
        metrics_series_observe_us(p->duration_series, us);
    }
}

static void request_log(struct conn *c)
{
    struct request *r = &c->req;
    if (r->chain_logged)
        filter_run_log(c);
    if (r->status)
        request_metrics(c, now_us() - r->start_us);
    if (c->w->log_fd < 0 || !r->method)
        return;
    /* Sampling spares the log the bulk of successful answers; errors are
     * always written. */
    const struct config_access_log *al = &c->ps->cfg->access_log;
    double rate = r->route && r->route->log_sample > 0 ? r->route->log_sample : al->sample;
    if (rate < 1.0 && r->status < 400 && worker_random(c->w) >= rate)
        return;
    struct accesslog_entry e = {
        .fields = r->log_fields,
        .client = c->peer_ip,
        .method = r->method,
        .host = r->host ? r->host : "",
        .path = r->path ? r->path : "",
        .path_len = r->path ? r->path_len : 0,
        .protocol = strcmp(r->method, "-") == 0 ? NULL
                    : c->h2s                    ? "HTTP/2.0"
                    : r->head.minor == 0        ? "HTTP/1.0"
                                                : "HTTP/1.1",
        .status = r->status,
        .bytes_in = r->bytes_in,
        .bytes_out = r->bytes_out,
        .duration_us = now_us() - r->start_us,
        .upstream_us =
            r->up_start_us ? (r->up_end_us ? r->up_end_us : now_us()) - r->up_start_us : 0,
        .has_upstream = r->up_start_us != 0,
        .route = r->route ? r->route->name : NULL,
        .endpoint = r->ep ? r->ep->address : NULL,
        .tls_version = c->ssl && !c->tls_hs ? tls_conn_version(c->ssl) : NULL,
        .tls_cipher = c->ssl && !c->tls_hs ? tls_conn_cipher(c->ssl) : NULL,
    };
    char line[12288]; /* fits the longest entry accesslog_format can make */
    size_t n = al->text ? accesslog_format_text(&e, al->template, line, sizeof(line))
                        : accesslog_format(&e, line, sizeof(line));
    worker_log_line(c->w, line, n);
}

/* The exchange is over: log it, give the upstream connection back, and
 * go on with the next request or towards closing. */
static void request_finish(struct conn *c)
{
    struct request *r = &c->req;
    if (c->up) {
        if (r->rs == RS_DONE && (r->rb == RB_DONE || r->rb == RB_NONE) && !r->resp.conn_close &&
            c->up->state == UP_ACTIVE)
            upconn_release(c->up);
        else
            upconn_close(c->up);
        c->up = NULL;
    }
    request_log(c);
    /* Not "&& !draining": an answer that went out without "Connection:
     * close" promised the client this connection; while draining it gets
     * limits.drain_idle_ms to send another request (answered with close). */
    int keep = r->keepalive && !c->close_after;
    request_reset(c);
    if (keep) {
        c->state = CS_HEAD;
        c->idle_since_ms = worker_now_ms(c->w);
    } else {
        c->close_after = 1;
        c->state = CS_LINGER;
    }
}

/* ---- reading ---------------------------------------------------------- */

/* TLS records may sit inside the SSL object, where no edge will announce
 * them: a TLS connection stays readable until OpenSSL holds nothing and
 * its last socket read was short (tls_drained), as a plain one stays
 * readable until a short read. */
static int client_read_tls(struct conn *c, size_t space)
{
    ssize_t n = tls_read(c->ssl, c->in.data + c->in.end, space);
    c->tls_rw = 0;
    if (n > 0) {
        c->in.end += (size_t)n;
        c->req.bytes_in += (size_t)n;
        if (!c->rdhup && tls_drained(c->ssl))
            c->readable = 0;
        return 1;
    }
    if (n == TLS_WANT_READ || n == TLS_WANT_WRITE) {
        c->readable = 0;
        c->tls_rw = n == TLS_WANT_WRITE;
        return 0;
    }
    if (n == TLS_FATAL)
        log_debug("client %s: TLS read: %s", c->peer_ip, tls_last_error(c->ssl));
    c->eof = 1;
    c->readable = 0;
    return 1;
}

/* nginx's answer to plain HTTP on a TLS port, sent in the clear. */
static const char plain_on_tls[] =
    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 46\r\n"
    "Connection: close\r\n\r\nThe plain HTTP request was sent to HTTPS port\n";

/* Drive the server handshake; the connection is HEAD meanwhile, its
 * deadline the handshake timeout. Returns 1 on progress. */
static int conn_handshake(struct conn *c)
{
    if (!(c->tls_hs_ww ? c->writable : c->readable))
        return 0;
    int rc = tls_handshake(c->ssl);
    if (rc == 1) {
        c->tls_hs = 0;
        metrics_add(&c->w->metrics, "portico_tls_handshakes_total", 1, "side", "client", "result",
                    tls_session_reused(c->ssl) ? "resumed" : "full", NULL, NULL);
        c->readable = 1; /* the request may have come with the Finished message */
        c->idle_since_ms = worker_now_ms(c->w);
        h2_start(c);
        return 1;
    }
    if (rc == TLS_WANT_READ || rc == TLS_WANT_WRITE) {
        c->tls_hs_ww = rc == TLS_WANT_WRITE;
        if (rc == TLS_WANT_READ)
            c->readable = 0;
        else
            c->writable = 0;
        return 0;
    }
    metrics_add(&c->w->metrics, "portico_tls_handshakes_total", 1, "side", "client", "result",
                tls_peer_sent_http() ? "plain_http" : "failed", NULL, NULL);
    if (!tls_peer_sent_http()) {
        log_debug("client %s: TLS handshake failed: %s", c->peer_ip, tls_last_error(c->ssl));
        c->dead = 1;
        return 1;
    }
    /* The bytes were a plain HTTP request: answer it in the clear, close. */
    tls_close(c->ssl);
    c->ssl = NULL;
    c->tls_hs = 0;
    struct request *r = &c->req;
    r->method = "-";
    r->status = 400;
    r->start_us = now_us();
    c->sp = plain_on_tls;
    c->sp_src = NULL;
    c->sp_len = sizeof(plain_on_tls) - 1;
    c->close_after = 1;
    c->linger_needed = 1;
    c->state = CS_LINGER;
    return 1;
}

/* RS_BODY_WAIT: the body goes straight into its copy, and no further:
 * the head stays where it is in c->in (its parsed fields point there). */
static int body_wait_read(struct conn *c)
{
    struct request *r = &c->req;
    size_t space = r->replay_len - r->replay.end;
    if (space == 0)
        return 0;
    char *dst = r->replay.data + r->replay.end;
    ssize_t n;
    if (c->ssl) {
        n = tls_read(c->ssl, dst, space);
        c->tls_rw = 0;
        if (n == TLS_WANT_READ || n == TLS_WANT_WRITE) {
            c->readable = 0;
            c->tls_rw = n == TLS_WANT_WRITE;
            return 0;
        }
    } else {
        n = read(c->fd, dst, space);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->readable = 0;
            return 0;
        }
        if (n < 0 && errno == EINTR)
            return 1;
    }
    if (n > 0) {
        r->replay.end += (size_t)n;
        r->bytes_in += (size_t)n;
        r->rb_total += (size_t)n;
        return 1;
    }
    c->eof = 1;
    c->readable = 0;
    return 1;
}

static int client_read(struct conn *c)
{
    if (!c->readable || c->eof || c->dead)
        return 0;
    if (c->h2s)
        return h2_stream_read(c);
    if (c->state == CS_LINGER) {
        char sink[16384];
        ssize_t n = read(c->fd, sink, sizeof(sink));
        if (n > 0) {
            c->req.bytes_in += (size_t)n;
            if (c->req.bytes_in > LINGER_MAX_BYTES)
                c->dead = 1;
            return 1;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->readable = 0;
            return 0;
        }
        c->eof = 1;
        return 1;
    }
    if (c->req.rs == RS_PAUSED) {
        /* The parsed head lives in c->in: do not move it. Only look for
         * the client going away, leaving any bytes in the socket. */
        char probe;
        ssize_t n = recv(c->fd, &probe, 1, MSG_PEEK);
        int gone = n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
        if (n > 0) {
            /* bytes are waiting: a FIN behind them shows in the TCP state */
            struct tcp_info ti;
            socklen_t tl = sizeof(ti);
            if (getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) == 0 &&
                ti.tcpi_state != TCP_ESTABLISHED)
                gone = 1;
        }
        if (gone) {
            c->eof = 1;
            c->readable = 0;
            return 1;
        }
        /* Records OpenSSL already holds bring no edge: stay readable. */
        if (n < 0 && !(c->ssl && tls_pending(c->ssl)))
            c->readable = 0;
        return 0;
    }
    if (c->req.rs == RS_BODY_WAIT)
        return body_wait_read(c);
    size_t space = buf_make_room(&c->in);
    if (space == 0)
        return 0;
    if (c->ssl)
        return client_read_tls(c, space);
    ssize_t n = read(c->fd, c->in.data + c->in.end, space);
    if (n > 0) {
        c->in.end += (size_t)n;
        c->req.bytes_in += (size_t)n;
        if ((size_t)n < space && !c->rdhup)
            c->readable = 0;
        return 1;
    }
    if (n == 0) {
        c->eof = 1;
        c->readable = 0;
        return 1;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
        c->readable = 0;
        return 0;
    }
    if (errno == EINTR)
        return 1;
    c->eof = 1;
    c->readable = 0;
    return 1;
}

/* ---- head handling ------------------------------------------------------ */

static char *lower_dup(struct arena *a, const char *s, size_t n)
{
    char *p = arena_alloc(a, n + 1);
    for (size_t i = 0; i < n; i++)
        p[i] = (s[i] >= 'A' && s[i] <= 'Z') ? (char)(s[i] + 32) : s[i];
    p[n] = '\0';
    return p;
}

static const struct http_header *find_header(const struct http_request *h, const char *name)
{
    for (size_t i = 0; i < h->nheaders; i++)
        if (http_token_eq(h->headers[i].name.p, h->headers[i].name.len, name))
            return &h->headers[i];
    return NULL;
}

/* grpc-timeout (1 to 8 digits and a unit: H M S m u n) as a deadline in
 * ms, rounded up; 0 when absent or malformed (then there is none, as in
 * Envoy). */
static uint64_t grpc_timeout_deadline(const struct http_request *h, uint64_t now)
{
    const struct http_header *t = find_header(h, "grpc-timeout");
    if (!t || t->value.len < 2 || t->value.len > 9)
        return 0;
    uint64_t v = 0;
    for (size_t i = 0; i + 1 < t->value.len; i++) {
        char ch = t->value.p[i];
        if (ch < '0' || ch > '9')
            return 0;
        v = v * 10 + (uint64_t)(ch - '0');
    }
    uint64_t ms;
    switch (t->value.p[t->value.len - 1]) {
    case 'H': ms = v * 3600000; break;
    case 'M': ms = v * 60000; break;
    case 'S': ms = v * 1000; break;
    case 'm': ms = v; break;
    case 'u': ms = (v + 999) / 1000; break;
    case 'n': ms = (v + 999999) / 1000000; break;
    default: return 0;
    }
    return now + (ms ? ms : 1);
}

/* Methods a path allows, for the Allow header of a 405. Slow path only. */
static void allow_header(struct conn *c, const char *host, size_t hlen, char *out, size_t cap)
{
    static const struct { enum http_method m; const char *s; } ms[] = {
        { HTTP_M_GET, "GET" },       { HTTP_M_HEAD, "HEAD" },   { HTTP_M_POST, "POST" },
        { HTTP_M_PUT, "PUT" },       { HTTP_M_DELETE, "DELETE" }, { HTTP_M_OPTIONS, "OPTIONS" },
        { HTTP_M_PATCH, "PATCH" },   { HTTP_M_TRACE, "TRACE" },
    };
    size_t n = (size_t)snprintf(out, cap, "Allow: ");
    int first = 1;
    for (size_t i = 0; i < sizeof(ms) / sizeof(ms[0]); i++) {
        const struct config_route *rt;
        struct http_str ms_str = { ms[i].s, strlen(ms[i].s) };
        if (router_match(c->ps->cfg->router, host, hlen, c->req.path, c->req.path_len, ms[i].m,
                         &ms_str, &rt) == ROUTER_MATCH) {
            n += (size_t)snprintf(out + n, cap - n, "%s%s", first ? "" : ", ", ms[i].s);
            first = 0;
        }
        if (n >= cap - 16)
            break;
    }
    snprintf(out + n, cap - n, "\r\n");
}

static void start_proxy(struct conn *c);
static void request_dispatch(struct conn *c);

/* An absolute-form authority becomes the Host we forward: hold it to the
 * same rules (a host name or [IPv6], then an optional port 1..65535). */
static int authority_valid(const char *a, size_t n)
{
    size_t i = 0;
    if (n && a[0] == '[') {
        for (i = 1; i < n && a[i] != ']'; i++)
            if (!strchr("0123456789abcdefABCDEF:.", a[i]))
                return 0;
        if (i >= n || i == 1)
            return 0;
        i++;
    } else {
        for (; i < n && a[i] != ':'; i++) {
            char ch = a[i];
            if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                  ch == '-' || ch == '.' || ch == '_' || ch == '~'))
                return 0;
        }
        if (i == 0)
            return 0;
    }
    if (i == n)
        return 1;
    if (a[i] != ':' || i + 1 == n || n - i - 1 > 5)
        return 0;
    unsigned port = 0;
    for (i++; i < n; i++) {
        if (a[i] < '0' || a[i] > '9')
            return 0;
        port = port * 10 + (unsigned)(a[i] - '0');
    }
    return port >= 1 && port <= 65535;
}

/* A plain listener with redirect_to_https: send the client to the same
 * host and target over https (301 for GET and HEAD, 308 otherwise, so
 * the method and body are kept). */
static void redirect_https(struct conn *c, const struct uri_target *t)
{
    struct request *r = &c->req;
    const char *h = r->host;
    size_t hl = strlen(h);
    if (hl && h[0] == '[') {
        const char *e = strchr(h, ']');
        hl = e ? (size_t)(e - h) + 1 : hl;
    } else {
        const char *colon = strchr(h, ':');
        if (colon)
            hl = (size_t)(colon - h);
    }
    r->path = arena_strndup(&c->arena, t->path ? t->path : "/", t->path ? t->path_len : 1);
    r->path_len = strlen(r->path);
    if (hl == 0 || t->asterisk) {
        respond_error(c, 400, NULL);
        return;
    }
    char port[16] = "";
    if (c->lc->redirect_port)
        snprintf(port, sizeof(port), ":%d", c->lc->redirect_port);
    size_t cap = hl + r->path_len + (t->query ? t->query_len + 1 : 0) + 64;
    char *loc = arena_alloc(&c->arena, cap);
    snprintf(loc, cap, "Location: https://%.*s%s%s%s%.*s\r\n", (int)hl, h, port, r->path,
             t->query ? "?" : "", t->query ? (int)t->query_len : 0, t->query ? t->query : "");
    int status = r->head.method == HTTP_M_GET || r->head.method == HTTP_M_HEAD ? 301 : 308;
    if (r->has_body) {
        r->keepalive = 0;
        c->linger_needed = 1;
    }
    conn_local_answer(c, status, "text/plain", "", 0, loc);
}

/* A complete head is at the front of c->in: decide what to do with it. */
static void request_begin(struct conn *c, size_t head_len)
{
    struct request *r = &c->req;
    struct http_request *h = &r->head;
    conn_follow_reload(c);
    const struct config_limits *l = limits(c);
    r->head_len = head_len;
    r->rb_start_ms = worker_now_ms(c->w);
    r->method = arena_strndup(&c->arena, h->method_str.p, h->method_str.len);
    r->keepalive = !h->conn_close && !worker_draining(c->w) && !c->h2s;
    r->has_body = h->chunked || h->content_length > 0;
    r->rb = h->chunked ? RB_CHUNKED : h->content_length > 0 ? RB_LENGTH : RB_NONE;
    r->rb_left = h->content_length > 0 ? (uint64_t)h->content_length : 0;
    /* gRPC calls are POSTs: other requests skip the field scan. */
    const struct http_header *ct = h->method == HTTP_M_POST ? find_header(h, "content-type") : NULL;
    r->grpc = ct && ct->value.len >= 16 && strncasecmp(ct->value.p, "application/grpc", 16) == 0;
    if (r->grpc)
        r->grpc_deadline_ms = grpc_timeout_deadline(h, worker_now_ms(c->w));

    struct uri_target t;
    if (uri_parse_target(h->target.p, h->target.len, &t) < 0) {
        r->keepalive = 0;
        respond_error(c, 400, NULL);
        return;
    }
    const char *host = h->host.p;
    size_t hlen = h->host.len;
    if (t.authority && !authority_valid(t.authority, t.authority_len)) {
        r->keepalive = 0;
        respond_error(c, 400, NULL);
        return;
    }
    if (t.authority) {
        host = t.authority;
        hlen = t.authority_len;
        r->authority = arena_strndup(&c->arena, t.authority, t.authority_len);
        r->authority_len = t.authority_len;
    }
    r->host = lower_dup(&c->arena, host, hlen);
    if (c->lc->redirect_to_https) {
        redirect_https(c, &t);
        return;
    }
    if (t.asterisk) {
        r->path = "*";
        r->path_len = 1;
        respond(c, 200, "text/plain", "", 0, "Allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n");
        return;
    }
    char *np = arena_alloc(&c->arena, t.path_len + 1);
    size_t nlen;
    if (uri_normalize_path(t.path, t.path_len, np, t.path_len + 1, &nlen) < 0) {
        r->path = arena_strndup(&c->arena, t.path, t.path_len);
        r->path_len = t.path_len;
        respond_error(c, 400, NULL);
        return;
    }
    np[nlen] = '\0';
    r->path = np;
    r->path_len = nlen;
    if (t.query) {
        r->query = arena_strndup(&c->arena, t.query, t.query_len);
        r->query_len = t.query_len;
    }
    if (l->max_body_bytes && h->content_length > 0 &&
        (uint64_t)h->content_length > l->max_body_bytes) {
        r->keepalive = 0;
        respond_error(c, 413, NULL);
        return;
    }
    const struct http_header *expect = find_header(h, "expect");
    if (expect && !h->expect_continue) {
        respond_error(c, 417, NULL);
        return;
    }

    const struct config_route *rt = NULL;
    r->route_result = router_match(c->ps->cfg->router, r->host, hlen, r->path, r->path_len,
                                   h->method, &h->method_str, &rt);
    r->route = r->route_result == ROUTER_MATCH ? rt : NULL;
    filter_chain_setup(c);
    if (r->nchain) {
        enum filter_status st = filter_run_request(c);
        if (st == FILTER_PAUSED) {
            /* The head stays where it is in c->in until the filter is
             * done: nothing reads into c->in while the request is paused. */
            r->rs = RS_PAUSED;
            c->state = CS_REQUEST;
            return;
        }
        if (st == FILTER_RESPONDED)
            return;
    }
    request_dispatch(c);
}

/* After the filters: not found, not allowed, a respond route, or proxy. */
static void request_dispatch(struct conn *c)
{
    struct request *r = &c->req;
    const struct config_route *rt = r->route;
    if (r->route_result == ROUTER_NOT_FOUND) {
        respond_error(c, 404, NULL);
        return;
    }
    if (r->route_result == ROUTER_METHOD_NOT_ALLOWED) {
        char allow[256];
        allow_header(c, r->host, strlen(r->host), allow, sizeof(allow));
        respond_error(c, 405, allow);
        return;
    }
    if (!rt->upstream) {
        if (r->has_body) {
            r->keepalive = 0;
            c->linger_needed = 1;
        }
        respond(c, rt->respond_status, rt->respond_content_type, rt->respond_body,
                rt->respond_body_len, NULL);
        return;
    }
    /* Elsewhere Upgrade and Connection are dropped as hop-by-hop fields and
     * the request goes on as a plain one (as nginx does). */
    r->ws = rt->websocket && tunnel_request_is_upgrade(&r->head);
    start_proxy(c);
}

/* The head has been acted on: drop its bytes (start_proxy did already when
 * it proxied). A body we did not read ends the connection. A paused
 * request, or one reading its body into a copy, still needs its head where
 * it is (the parsed fields point into c->in). */
static void request_head_done(struct conn *c)
{
    struct request *r = &c->req;
    if (r->rs == RS_PAUSED || r->rs == RS_BODY_WAIT)
        return;
    if (!r->head_consumed) {
        buf_consume(&c->in, r->head_len);
        r->head_consumed = 1;
    }
    if (r->rs == RS_LOCAL && r->has_body) {
        r->keepalive = 0;
        c->close_after = 1;
        c->linger_needed = 1;
        buf_consume(&c->in, buf_len(&c->in));
    }
}

static int handle_head(struct conn *c)
{
    struct request *r = &c->req;
    if (buf_len(&c->out) > OUT_HIGH_WATER || c->sp_len)
        return 0; /* earlier answers still leaving: back-pressure on pipelining */
    if (buf_len(&c->in) == 0) {
        /* Draining does not close an idle connection here: its next
         * request may be on the way (see conn_drain, idle_limit). */
        if (c->eof)
            c->dead = 1;
        return c->dead;
    }
    if (!c->head_start_ms) {
        c->head_start_ms = worker_now_ms(c->w);
        r->start_us = now_us();
    }
    if (!r->head.headers) /* trimmed while idle (conn_trim_idle) */
        r->head.headers =
            arena_alloc(&c->arena, sizeof(struct http_header) * r->head.max_headers_cap);
    struct http_parse_limits pl = {
        .max_head_bytes = limits(c)->max_header_bytes,
        .max_headers = limits(c)->max_headers,
        .max_target_bytes = limits(c)->max_uri_bytes,
    };
    int rc = http_parse_request(buf_head(&c->in), buf_len(&c->in), &c->scanned, &pl, &r->head);
    if (rc == 0) {
        if (c->eof)
            c->dead = 1; /* closed mid-head: nobody to answer */
        return c->dead;
    }
    if (rc < 0) {
        log_debug("client %s: request refused (%d): %s", c->peer_ip, -rc, http_last_error());
        r->keepalive = 0;
        r->method = "-";
        c->linger_needed = 1;
        buf_consume(&c->in, buf_len(&c->in));
        respond_error(c, -rc, NULL);
        return 1;
    }
    request_begin(c, (size_t)rc);
    request_head_done(c);
    return 1;
}

/* ---- proxying ----------------------------------------------------------- */

static void upstream_gone(struct conn *c, int status, const char *why);

/* The client left mid-exchange: cancel the upstream request. */
static void client_gone(struct conn *c)
{
    if (c->up) {
        upconn_close(c->up);
        c->up = NULL;
    }
    c->req.status = 499;
    c->dead = 1;
}

/* RFC 9110 9.2.2: only these may be sent again without asking. */
static int method_idempotent(enum http_method m)
{
    return m == HTTP_M_GET || m == HTTP_M_HEAD || m == HTTP_M_OPTIONS || m == HTTP_M_TRACE ||
           m == HTTP_M_PUT || m == HTTP_M_DELETE;
}

static void upstream_warn(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static double conn_random(void *w)
{
    return worker_random(w);
}

/* The client address only when the balancer hashes on it (finding it may
 * parse X-Forwarded-For). */
static const char *pick_client_ip(struct request *r)
{
    const struct resil_upstream *ru = r->route->upstream->resil;
    return ru->balance == BAL_HASH && ru->hash_on == HASH_CLIENT_ADDRESS ? request_client_ip(r)
                                                                         : NULL;
}

/* Every endpoint ejected or unhealthy, or the upstream over its limits:
 * answer at once without touching it. */
static void upstream_refuse(struct conn *c, const char *kind)
{
    struct request *r = &c->req;
    const char *name = r->route->upstream->name;
    metrics_add(&c->w->metrics, "portico_upstream_refused_total", 1, "upstream", name, "kind", kind,
                NULL, NULL);
    upstream_warn(c, "upstream %s: %s: answering 503", name, kind);
    r->up_end_us = now_us();
    if (r->rb != RB_DONE && r->rb != RB_NONE)
        r->keepalive = 0;
    if (!r->keepalive)
        buf_consume(&c->in, buf_len(&c->in));
    respond_error(c, 503, "Retry-After: 1\r\n");
}

/* Connect (or take a pooled connection) for the try on endpoint idx.
 * Returns 0, or -1 when the upstream was refused (answered already). */
static int proxy_try_begin(struct conn *c, int idx)
{
    struct request *r = &c->req;
    const struct config_upstream *up = r->route->upstream;
    struct pool *p = &c->ps->pools[up->index][idx];
    uint64_t now = worker_now_ms(c->w);
    r->ep = p->ep;
    const struct config_limits *l = limits(c);
    c->up = upconn_get(p, c, up_in_cap(l), out_cap(l));
    if (!c->up)
        return 0;
    if (c->up->state == UP_CONNECTING) {
        r->up_connect_deadline_ms = now + (uint64_t)up->connect_timeout_ms;
        if (resil_pending(&r->resil, 1) < 0) {
            upconn_close(c->up);
            c->up = NULL;
            upstream_refuse(c, "max_pending");
            return -1;
        }
    }
    c->up->requests++;
    if (up->resil->retry.per_try_timeout_ms)
        r->resil.try_deadline_ms = now + (uint64_t)up->resil->retry.per_try_timeout_ms;
    r->up_activity_ms = now;
    return 0;
}

static int may_retry_request(const struct request *r)
{
    const struct resil_retry *rt = &r->route->upstream->resil->retry;
    return rt->attempts > 1 &&
           (method_idempotent(r->head.method) || rt->non_idempotent || r->route->retry_non_idempotent);
}

/* A small Content-Length body is kept for retries. When it did not all
 * come with the head, it is read into a copy first, and the first try
 * starts once it is complete (as Envoy buffers a body up to its limit);
 * meanwhile the request holds no upstream slot. */
static int body_wait_begin(struct conn *c)
{
    struct request *r = &c->req;
    const struct resil_retry *rt = &r->route->upstream->resil->retry;
    size_t have = buf_len(&c->in) - r->head_len;
    if (r->rs == RS_BODY_WAIT || r->replay.data || c->h2s || r->ws || r->rb != RB_LENGTH ||
        r->body_hooks || !may_retry_request(r) || r->rb_left > (uint64_t)rt->max_replay_body_bytes ||
        have >= r->rb_left)
        return 0;
    r->replay_len = (size_t)r->rb_left;
    r->replay.data = arena_alloc(&c->arena, r->replay_len);
    r->replay.cap = r->replay_len;
    r->replay.start = 0;
    /* Every byte after the head belongs to this body (it is not complete):
     * move them to the copy and leave the head alone. */
    memcpy(r->replay.data, buf_head(&c->in) + r->head_len, have);
    r->replay.end = have;
    c->in.end -= have;
    r->rb_total = have;
    c->state = CS_REQUEST;
    r->rs = RS_BODY_WAIT;
    r->rb_start_ms = worker_now_ms(c->w);
    if (r->head.expect_continue && r->head.minor == 1 && have == 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        buf_append(&c->out, cont, sizeof(cont) - 1);
        r->continue_sent = 1;
    }
    return 1;
}

/* The request again on a new try: the head (and a small body read with
 * it) from up_head, a body read after the head from its rewound copy. */
static void send_again(struct conn *c)
{
    struct request *r = &c->req;
    buf_append(&c->up->out, r->up_head, r->up_head_len);
    if (r->replay.data) {
        r->replay.start = 0;
        r->replay.end = r->replay_len;
        c->up->span_src = &r->replay;
        c->up->span_len = r->replay_len;
    }
    if (r->resil.body_kept)
        r->rb = RB_FLUSH;
}

static void start_proxy(struct conn *c)
{
    struct request *r = &c->req;
    const struct config_upstream *up = r->route->upstream;
    struct worker *w = c->w;
    if (body_wait_begin(c))
        return;
    c->state = CS_REQUEST;
    r->rs = RS_WAIT_HEAD;
    r->up_start_us = now_us();
    r->rb_start_ms = worker_now_ms(w);
    r->up_activity_ms = r->rb_start_ms;
    http_chunked_init(&r->rb_chunk);
    http_chunked_init(&r->rs_chunk);
    if (resil_admit(&r->resil, up->resil, r->rb_start_ms) < 0) {
        upstream_refuse(c, "max_requests");
        return;
    }
    int idx = resil_pick(&r->resil, up, &c->ps->rr[up->index], &r->head, pick_client_ip(r),
                         conn_random, w, r->rb_start_ms);
    if (idx < 0) {
        upstream_refuse(c, "no endpoint available");
        return;
    }
    if (proxy_try_begin(c, idx) < 0)
        return;
    if (!c->up) {
        upstream_warn(c, "upstream %s (%s): cannot connect: %s", up->name, r->ep->address,
                      strerror(errno));
        upstream_gone(c, 502, "connect");
        return;
    }
    size_t before = buf_len(&c->up->out);
    proxy_build_request(c, &c->up->out);
    const struct resil_retry *rt = &up->resil->retry;
    int idem = method_idempotent(r->head.method);
    int may_retry = may_retry_request(r);
    /* A small body already read in full is sent from a copy, so that a
     * retry can send it again; bigger or chunked bodies stream and are
     * not replayable. */
    size_t body_kept = 0;
    if (r->replay.data) {
        /* read into its copy while waiting (body_wait_begin): sent as a span */
        r->rb_total = r->replay_len;
        r->rb_left = 0;
        r->rb = RB_FLUSH;
        r->resil.body_kept = 1;
    } else if (may_retry && r->rb == RB_LENGTH && !r->body_hooks &&
               r->rb_left <= (uint64_t)rt->max_replay_body_bytes &&
               buf_len(&c->in) - r->head_len >= r->rb_left) {
        body_kept = (size_t)r->rb_left;
        buf_append(&c->up->out, buf_head(&c->in) + r->head_len, body_kept);
        r->rb_total = r->rb_left;
        r->rb_left = 0;
        r->rb = RB_FLUSH;
        r->resil.body_kept = 1;
    }
    /* Keep a copy for a retry, or for one replay on a fresh connection if
     * this pooled one turns out to be dead (requests without a body). */
    if ((may_retry && (r->rb == RB_NONE || body_kept || r->replay.data)) ||
        (c->up->reused && r->rb == RB_NONE && idem)) {
        r->up_head_len = buf_len(&c->up->out) - before;
        r->up_head = arena_alloc(&c->arena, r->up_head_len);
        memcpy(r->up_head, buf_head(&c->up->out) + before, r->up_head_len);
    }
    if (r->replay.data) {
        c->up->span_src = &r->replay;
        c->up->span_len = r->replay_len;
    }
    buf_consume(&c->in, r->head_len + body_kept);
    r->head_consumed = 1;
    if (r->head.expect_continue && r->has_body && buf_len(&c->in) == 0 && r->head.minor == 1 &&
        !r->continue_sent) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        buf_append(&c->out, cont, sizeof(cont) - 1);
    }
}

/* The next try of a retry, after its backoff. */
static void retry_now(struct conn *c)
{
    struct request *r = &c->req;
    const struct config_upstream *up = r->route->upstream;
    uint64_t now = worker_now_ms(c->w);
    r->resil.retry_at_ms = 0;
    int idx = resil_pick(&r->resil, up, &c->ps->rr[up->index], &r->head, pick_client_ip(r),
                         conn_random, c->w, now);
    if (idx < 0) {
        upstream_refuse(c, "no endpoint available");
        return;
    }
    if (proxy_try_begin(c, idx) < 0)
        return;
    if (!c->up) {
        upstream_gone(c, 502, "connect");
        return;
    }
    send_again(c);
    log_debug("retry %d of a request to upstream %s on %s", r->resil.attempts - 1, up->name,
              r->ep->address);
}

/* A try failed before any response byte reached the client: retry it
 * when the policy, the method, the body and the budget allow. Returns 1
 * when a retry is under way (now or after its backoff). */
static int retry_schedule(struct conn *c, unsigned kind, int status)
{
    struct request *r = &c->req;
    const char *name = r->route->upstream->name;
    uint64_t now = worker_now_ms(c->w);
    int exhausted = 0;
    int replayable = r->up_head && (r->rb == RB_NONE || r->resil.body_kept);
    if (r->resp_started || r->rs != RS_WAIT_HEAD ||
        !resil_may_retry(&r->resil, kind, status,
                         method_idempotent(r->head.method) || r->route->retry_non_idempotent,
                         replayable, now, &exhausted)) {
        if (exhausted)
            metrics_add(&c->w->metrics, "portico_upstream_retry_budget_exhausted_total", 1,
                        "upstream", name, NULL, NULL, NULL, NULL);
        return 0;
    }
    metrics_add(&c->w->metrics, "portico_upstream_retries_total", 1, "upstream", name, NULL, NULL,
                NULL, NULL);
    if (c->up) {
        upconn_close(c->up);
        c->up = NULL;
    }
    resil_try_end(&r->resil);
    if (r->resil.body_kept)
        r->rb = RB_DONE; /* all read from the client; sent again from the copy */
    r->up_eof = 0;
    r->up_write_failed = 0;
    r->up_connect_deadline_ms = 0;
    struct http_header *keep = r->resp.headers;
    memset(&r->resp, 0, sizeof(r->resp));
    r->resp.headers = keep;
    r->resp.max_headers_cap = limits(c)->max_headers;
    r->resp_scanned = 0;
    uint64_t wait = resil_backoff_ms(&r->resil, worker_random(c->w));
    if (!wait) {
        retry_now(c);
        return 1;
    }
    r->resil.retry_at_ms = now + wait;
    return 1;
}

/* Tell the breaker how the current try went. */
static void try_verdict(struct conn *c, int ok)
{
    struct request *r = &c->req;
    if (resil_verdict(&r->resil, ok, worker_now_ms(c->w))) {
        metrics_add(&c->w->metrics, "portico_upstream_ejections_total", 1, "upstream",
                    r->route->upstream->name, "endpoint", r->ep ? r->ep->address : "", NULL, NULL);
        log_warn("upstream %s (%s): circuit breaker open", r->route->upstream->name,
                 r->ep ? r->ep->address : "-");
    }
}

/* Upstream trouble goes to the error log at most once a second per
 * worker: an outage must not write a line per request. The next line
 * says how many were left out; each carries the request id if known. */
static void upstream_warn(struct conn *c, const char *fmt, ...)
{
    struct worker *w = c->w;
    if (LOG_WARN < log_min_level)
        return;
    uint64_t now = worker_now_ms(w);
    if (w->warn_at_ms && now - w->warn_at_ms < 1000) {
        w->warn_suppressed++;
        return;
    }
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    const char *rid = request_var(&c->req, "request_id");
    char more[64] = "";
    if (w->warn_suppressed)
        snprintf(more, sizeof(more), " (and %u more upstream errors in the last %.1f s)",
                 w->warn_suppressed, (double)(now - w->warn_at_ms) / 1000);
    log_warn("%s%s%s%s%s", msg, rid ? " [request " : "", rid ? rid : "", rid ? "]" : "", more);
    w->warn_at_ms = now;
    w->warn_suppressed = 0;
}

/* The upstream exchange failed before or during the response. */
static void upstream_gone(struct conn *c, int status, const char *why)
{
    struct request *r = &c->req;
    struct upconn *u = c->up;
    /* A reused connection the upstream had closed: replay once on a new
     * connection, when nothing of the response has arrived and the
     * request has no body to replay. */
    if (u && u->reused && !r->retried && r->up_head && r->rs == RS_WAIT_HEAD &&
        buf_len(&u->in) == 0 && status == 502) {
        struct pool *p = u->pool;
        upconn_close(u);
        c->up = NULL;
        r->retried = 1;
        r->up_eof = 0;
        r->up_write_failed = 0;
        /* Skip the other idle ones: they are likely as stale. */
        pool_close_all(p);
        const struct config_limits *l = limits(c);
        c->up = upconn_get(p, c, up_in_cap(l), out_cap(l));
        if (c->up) {
            c->up->requests++;
            r->up_connect_deadline_ms = worker_now_ms(c->w) + (uint64_t)p->up->connect_timeout_ms;
            send_again(c);
            log_debug("retrying on a new connection to %s after %s", p->ep->address, why);
            return;
        }
    }
    r->up_end_us = now_us();
    const char *kind = status == 504                           ? "timeout"
                       : strncmp(why, "connect", 7) == 0        ? "connect"
                       : strcmp(why, "connection reset") == 0   ? "reset"
                                                                : "protocol";
    metrics_add(&c->w->metrics, "portico_upstream_errors_total", 1, "upstream",
                r->route->upstream->name, "endpoint", r->ep ? r->ep->address : "", "kind", kind);
    try_verdict(c, 0);
    unsigned rkind = status == 504                     ? RETRY_ON_TIMEOUT
                     : strncmp(why, "connect", 7) == 0 ? RETRY_ON_CONNECT
                     : strcmp(why, "connection reset") == 0 ||
                             strcmp(why, "upstream closed without answering") == 0
                         ? RETRY_ON_RESET
                         : 0;
    if (rkind && (!c->up || buf_len(&c->up->in) == 0) && retry_schedule(c, rkind, 0))
        return;
    if (!r->resp_started && c->up) {
        upconn_close(c->up);
        c->up = NULL;
    }
    if (!r->resp_started) {
        upstream_warn(c, "upstream %s (%s): %s: answering %d", r->route->upstream->name,
                 r->ep ? r->ep->address : "-", why, status);
        if (r->rb != RB_DONE && r->rb != RB_NONE)
            r->keepalive = 0;
        /* What remains of the request body in c->in cannot be parsed as a
         * request: with keepalive off it is dropped. */
        if (!r->keepalive)
            buf_consume(&c->in, buf_len(&c->in));
        respond_error(c, status, NULL);
    } else {
        upstream_warn(c, "upstream %s (%s): %s after the response started: closing the client connection",
                 r->route->upstream->name, r->ep ? r->ep->address : "-", why);
        /* The upconn stays with us until the conn is freed: the bytes
         * still to be written to the client may live in its buffer. */
        r->rs = RS_ABORT;
        r->keepalive = 0;
        c->close_after = 1;
    }
}

/* The TLS handshake with the upstream, under the connect deadline. */
static int upstream_handshake(struct conn *c)
{
    struct upconn *u = c->up;
    if (!(u->tls_hs_ww ? u->writable : u->readable))
        return 0;
    int rc = tls_handshake(u->ssl);
    if (rc == 1) {
        metrics_add(&c->w->metrics, "portico_tls_handshakes_total", 1, "side", "upstream",
                    "result", tls_session_reused(u->ssl) ? "resumed" : "full", NULL, NULL);
        u->state = UP_ACTIVE;
        u->readable = 1;
        c->req.up_connect_deadline_ms = 0;
        return 1;
    }
    if (rc == TLS_WANT_READ || rc == TLS_WANT_WRITE) {
        u->tls_hs_ww = rc == TLS_WANT_WRITE;
        if (rc == TLS_WANT_READ)
            u->readable = 0;
        else
            u->writable = 0;
        return 0;
    }
    metrics_add(&c->w->metrics, "portico_tls_handshakes_total", 1, "side", "upstream", "result",
                "failed", NULL, NULL);
    char why[320];
    snprintf(why, sizeof(why), "TLS handshake failed: %s", tls_last_error(u->ssl));
    upstream_gone(c, 502, why);
    return 1;
}

static int upstream_connect_check(struct conn *c)
{
    struct upconn *u = c->up;
    if (!u || u->state != UP_CONNECTING)
        return 0;
    if (u->ssl)
        return upstream_handshake(c);
    if (!u->writable)
        return 0;
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err == EINPROGRESS || err == EALREADY) {
        u->writable = 0;
        return 0;
    }
    if (err) {
        errno = err;
        char why[128];
        snprintf(why, sizeof(why), "connect: %s", strerror(err));
        upstream_gone(c, 502, why);
        return 1;
    }
    const struct tls_client *tc = c->req.route->upstream->tls;
    if (tc) {
        u->ssl = tls_client_conn(tc, u->fd, u->pool->ep->address, &u->pool->tls_session);
        if (!u->ssl) {
            upstream_gone(c, 502, "cannot create a TLS session");
            return 1;
        }
        u->tls_hs_ww = 1;
        upstream_handshake(c);
        return 1;
    }
    u->state = UP_ACTIVE;
    c->req.up_connect_deadline_ms = 0;
    resil_pending(&c->req.resil, 0);
    return 1;
}

static int upstream_flush(struct conn *c)
{
    struct upconn *u = c->up;
    if (!u || u->state != UP_ACTIVE || !u->writable || c->req.up_write_failed)
        return 0;
    if (u->pool->up->h2)
        return h2up_flush(c, u);
    size_t olen = buf_len(&u->out);
    if (olen + u->span_len == 0)
        return 0;
    struct iovec iov[2];
    int n = 0;
    if (olen) {
        iov[n].iov_base = buf_head(&u->out);
        iov[n++].iov_len = olen;
    }
    if (u->span_len) {
        iov[n].iov_base = buf_head(u->span_src);
        iov[n++].iov_len = u->span_len;
    }
    ssize_t wr = upconn_writev(u, iov, n);
    if (wr < 0) {
        if (errno == EAGAIN)
            return 0;
        if (errno == EINTR)
            return 1;
        /* The upstream may have answered (say, 413) and closed before
         * taking the whole body: read what it sent before deciding. */
        log_debug("upstream write: %s", strerror(errno));
        c->req.up_write_failed = 1;
        u->readable = 1;
        buf_consume(&u->out, buf_len(&u->out));
        if (u->span_len) {
            u->span_src = NULL;
            u->span_len = 0;
        }
        c->req.keepalive = 0;
        return 1;
    }
    size_t w = (size_t)wr;
    size_t from_out = w < olen ? w : olen;
    buf_consume(&u->out, from_out);
    w -= from_out;
    if (w) {
        buf_consume(u->span_src, w);
        u->span_len -= w;
    }
    c->req.up_activity_ms = worker_now_ms(c->w);
    return 1;
}

static int upstream_read(struct conn *c, int *eof)
{
    struct upconn *u = c->up;
    *eof = 0;
    if (u && u->state == UP_ACTIVE && u->pool->up->h2)
        return h2up_read(c, u, eof);
    if (!u || u->state != UP_ACTIVE || !u->readable)
        return 0;
    size_t space = buf_make_room(&u->in);
    if (space == 0)
        return 0;
    ssize_t n = upconn_read(u, u->in.data + u->in.end, space);
    if (n > 0) {
        u->in.end += (size_t)n;
        c->req.up_activity_ms = worker_now_ms(c->w);
        return 1;
    }
    if (n < 0 && errno == EAGAIN)
        return 0;
    if (n < 0 && errno == EINTR)
        return 1;
    *eof = n < 0 ? -1 : 1;
    u->readable = 0;
    return 1;
}

/* Append "<hex>\r\n<data>\r\n" to out. */
static void put_chunk(struct buf *out, const char *data, size_t len)
{
    char sz[24];
    int n = snprintf(sz, sizeof(sz), "%zx\r\n", len);
    buf_append(out, sz, (size_t)n);
    buf_append(out, data, len);
    buf_append(out, "\r\n", 2);
}

/* Free room in a sink buffer, counting what compaction gains. */
static size_t room(const struct buf *b) { return b->cap - buf_len(b); }

enum relay_result { RELAY_IDLE, RELAY_PROGRESS, RELAY_DONE, RELAY_ERROR, RELAY_TOO_BIG, RELAY_REFUSED };

/* A body filter answered: stop sending the body and answer instead. */
static void body_refused(struct conn *c)
{
    struct request *r = &c->req;
    if (c->up) {
        upconn_close(c->up);
        c->up = NULL;
    }
    r->keepalive = 0;
    c->linger_needed = 1;
    buf_consume(&c->in, buf_len(&c->in));
    if (!r->resp_started)
        local_commit(c);
    else
        c->dead = 1;
}

/* Decode a chunked body from the front of src into dst, re-chunked when
 * rechunk (trailers kept) or as raw bytes (trailers dropped). Stops when
 * src is used up or dst is nearly full; never splits a decoder event, so
 * the input view is cut to what dst can take. *count adds the data bytes;
 * limit (0 = none) caps it. */
static enum relay_result relay_chunked(struct http_chunked *st, struct buf *src, struct buf *dst,
                                       int rechunk, int *last_chunk, uint64_t *count,
                                       uint64_t limit, struct conn *hooks)
{
    enum relay_result res = RELAY_IDLE;
    while (buf_len(src) && room(dst) > 64) {
        size_t view = buf_len(src);
        if (view > room(dst) - 40)
            view = room(dst) - 40;
        size_t consumed = 0;
        const char *data;
        size_t dlen;
        int rc = http_chunked_decode(st, buf_head(src), view, &consumed, &data, &dlen);
        if (rc == HTTP_CHUNK_ERROR)
            return RELAY_ERROR;
        if (rc == HTTP_CHUNK_DATA) {
            *count += dlen;
            if (limit && *count > limit)
                return RELAY_TOO_BIG;
            if (hooks && filter_run_body(hooks, data, dlen) == FILTER_RESPONDED)
                return RELAY_REFUSED;
            if (rechunk)
                put_chunk(dst, data, dlen);
            else
                buf_append(dst, data, dlen);
        } else if (rc == HTTP_CHUNK_TRAILER && rechunk) {
            if (!*last_chunk) {
                buf_append(dst, "0\r\n", 3);
                *last_chunk = 1;
            }
            buf_append(dst, data, dlen);
            buf_append(dst, "\r\n", 2);
        } else if (rc == HTTP_CHUNK_DONE) {
            if (rechunk) {
                if (!*last_chunk)
                    buf_append(dst, "0\r\n", 3);
                buf_append(dst, "\r\n", 2);
            }
            buf_consume(src, consumed);
            return RELAY_DONE;
        }
        buf_consume(src, consumed);
        if (consumed)
            res = RELAY_PROGRESS;
        if (rc == HTTP_CHUNK_MORE)
            break;
    }
    return res;
}

/* Move request body bytes from c->in towards the upstream. */
static int request_body_feed(struct conn *c)
{
    struct request *r = &c->req;
    struct upconn *u = c->up;
    const struct config_limits *l = limits(c);
    if (!u || r->up_write_failed)
        return 0;
    switch (r->rb) {
    case RB_NONE:
    case RB_DONE:
        return 0;
    case RB_FLUSH:
        if (buf_len(&u->out) == 0 && u->span_len == 0) {
            r->rb = RB_DONE;
            r->up_activity_ms = worker_now_ms(c->w);
            return 1;
        }
        return 0;
    case RB_LENGTH: {
        int progress = 0;
        size_t avail = buf_len(&c->in) - u->span_len;
        size_t add = avail < r->rb_left ? avail : (size_t)r->rb_left;
        if (add) {
            if (r->body_hooks &&
                filter_run_body(c, buf_head(&c->in) + u->span_len, add) == FILTER_RESPONDED) {
                body_refused(c);
                return 1;
            }
            u->span_src = &c->in;
            u->span_len += add;
            r->rb_left -= add;
            r->rb_total += add;
            progress = 1;
        }
        if (r->rb_left == 0) {
            r->rb = RB_FLUSH;
            progress = 1;
        } else if (c->eof) {
            client_gone(c);
            return 1;
        }
        return progress;
    }
    case RB_CHUNKED: {
        enum relay_result rr = relay_chunked(&r->rb_chunk, &c->in, &u->out, 1, &r->rb_last_chunk,
                                             &r->rb_total, l->max_body_bytes,
                                             r->body_hooks ? c : NULL);
        if (rr == RELAY_REFUSED) {
            body_refused(c);
            return 1;
        }
        if (rr == RELAY_ERROR || rr == RELAY_TOO_BIG) {
            if (rr == RELAY_ERROR)
                log_debug("client %s: bad chunked body: %s", c->peer_ip, http_last_error());
            r->keepalive = 0;
            c->linger_needed = 1;
            buf_consume(&c->in, buf_len(&c->in));
            upconn_close(c->up);
            c->up = NULL;
            if (!r->resp_started)
                respond_error(c, rr == RELAY_ERROR ? 400 : 413, NULL);
            else
                c->dead = 1;
            return 1;
        }
        if (rr == RELAY_DONE) {
            r->rb = RB_FLUSH;
            return 1;
        }
        if (rr == RELAY_IDLE && c->eof && room(&u->out) > 64) {
            client_gone(c);
            return 1;
        }
        return rr == RELAY_PROGRESS;
    }
    }
    return 0;
}

/* Parse the response head at the front of u->in and queue ours. */
static int response_head(struct conn *c)
{
    struct request *r = &c->req;
    struct upconn *u = c->up;
    const struct config_limits *l = limits(c);
    if (buf_len(&u->in) == 0)
        return 0;
    if (buf_len(&c->out) + c->sp_len > OUT_HIGH_WATER)
        return 0;
    if (!r->resp.headers) {
        r->resp.max_headers_cap = l->max_headers;
        r->resp.headers = arena_alloc(&c->arena, sizeof(struct http_header) * l->max_headers);
    }
    struct http_parse_limits pl = {
        .max_head_bytes = l->max_header_bytes,
        .max_headers = l->max_headers,
        .max_target_bytes = l->max_uri_bytes,
    };
    int rc = http_parse_response(buf_head(&u->in), buf_len(&u->in), &r->resp_scanned, &pl, &r->resp);
    if (rc == 0)
        return 0;
    if (rc < 0) {
        char why[160];
        snprintf(why, sizeof(why), "invalid response: %s", http_last_error());
        upstream_gone(c, 502, why);
        return 1;
    }
    if (r->resp.status == 101 && r->ws && tunnel_response_ok(&r->resp)) {
        if (r->chain_ok) {
            r->status = 101;
            filter_run_response(c);
        }
        if (!r->local.set) {
            tunnel_begin(c, (size_t)rc);
            return 1;
        }
        upconn_close(c->up); /* a filter refused the switch */
        c->up = NULL;
        r->up_end_us = now_us();
        local_commit(c);
        return 1;
    }
    if (r->ws)
        r->resp.conn_close = 1; /* the upstream may think it switched: do not reuse it */
    if (r->resp.status < 200) {
        /* 1xx: interim answers are not relayed (we took Expect off the
         * request); a 101 that is not the answer to a WebSocket upgrade we
         * forwarded (tunnel.h) would switch to a protocol we do not relay. */
        if (r->resp.status == 101) {
            upstream_gone(c, 502, "unexpected 101 Switching Protocols");
            return 1;
        }
        buf_consume(&u->in, (size_t)rc);
        struct http_header *keep = r->resp.headers;
        memset(&r->resp, 0, sizeof(r->resp));
        r->resp.headers = keep;
        r->resp.max_headers_cap = l->max_headers;
        r->resp_scanned = 0;
        return 1;
    }
    {
        const struct resil_upstream *ru = r->route->upstream->resil;
        int st = r->resp.status;
        try_verdict(c, !resil_status_in(ru->failure_status, st));
        /* A 503 or 429 that asks for time (Retry-After > 0) goes to the
         * client rather than being retried sooner than it asked. */
        int ra = st == 503 || st == 429 ? resil_retry_after(&r->resp) : -1;
        if (resil_status_in(ru->retry.on_status, st) && ra <= 0 && retry_schedule(c, 0, st))
            return 1;
    }
    if (r->chain_ok) {
        r->status = r->resp.status;
        filter_run_response(c);
        if (r->local.set) {
            /* A filter replaced the upstream's answer. */
            upconn_close(c->up);
            c->up = NULL;
            r->up_end_us = now_us();
            local_commit(c);
            return 1;
        }
    }
    enum http_body_kind kind = http_response_body_kind(&r->resp, r->head.method);
    r->status = r->resp.status;
    r->out_chunked = 0;
    if (kind == HTTP_BODY_CHUNKED || kind == HTTP_BODY_UNTIL_CLOSE) {
        if (r->head.minor == 1)
            r->out_chunked = 1;
        else
            r->keepalive = 0; /* a 1.0 client learns the end from the close */
    }
    if (worker_draining(c->w))
        r->keepalive = 0;
    if (!r->keepalive)
        c->close_after = 1;
    proxy_build_response(c, &r->resp, (int)kind);
    buf_consume(&u->in, (size_t)rc);
    r->resp_started = 1;
    switch (kind) {
    case HTTP_BODY_NONE:
        r->rs = RS_DONE;
        break;
    case HTTP_BODY_LENGTH:
        r->rs_left = (uint64_t)r->resp.content_length;
        r->rs = r->rs_left ? RS_BODY_LENGTH : RS_DONE;
        break;
    case HTTP_BODY_CHUNKED:
        r->rs = RS_BODY_CHUNKED;
        break;
    case HTTP_BODY_UNTIL_CLOSE:
        r->rs = RS_BODY_CLOSE;
        break;
    }
    if (r->rs == RS_DONE)
        r->up_end_us = now_us();
    return 1;
}

/* Move response body bytes from u->in towards the client. */
static int response_body_feed(struct conn *c, int up_eof)
{
    struct request *r = &c->req;
    struct upconn *u = c->up;
    int progress = 0;
    switch (r->rs) {
    case RS_BODY_LENGTH: {
        if (c->sp_len && c->sp_src != &u->in)
            return 0;
        size_t avail = buf_len(&u->in) - c->sp_len;
        size_t add = avail < r->rs_left ? avail : (size_t)r->rs_left;
        if (add) {
            c->sp_src = &u->in;
            c->sp = NULL;
            c->sp_len += add;
            r->rs_left -= add;
            progress = 1;
        }
        if (r->rs_left == 0) {
            r->rs = RS_DONE;
            r->up_end_us = now_us();
            progress = 1;
        } else if (up_eof) {
            upstream_gone(c, 502, "upstream closed before the end of the body");
            progress = 1;
        }
        return progress;
    }
    case RS_BODY_CHUNKED: {
        uint64_t ignored = 0;
        enum relay_result rr = relay_chunked(&r->rs_chunk, &u->in, &c->out, r->out_chunked,
                                             &r->rs_last_chunk, &ignored, 0, NULL);
        if (rr == RELAY_ERROR) {
            upstream_gone(c, 502, "invalid chunked body");
            return 1;
        }
        if (rr == RELAY_DONE) {
            r->rs = RS_DONE;
            r->up_end_us = now_us();
            return 1;
        }
        if (up_eof && rr == RELAY_IDLE && room(&c->out) > 64) {
            upstream_gone(c, 502, "upstream closed before the end of the chunked body");
            return 1;
        }
        return rr == RELAY_PROGRESS;
    }
    case RS_BODY_CLOSE:
        if (r->out_chunked) {
            while (buf_len(&u->in) && room(&c->out) > 64) {
                size_t n = buf_len(&u->in);
                if (n > room(&c->out) - 40)
                    n = room(&c->out) - 40;
                put_chunk(&c->out, buf_head(&u->in), n);
                buf_consume(&u->in, n);
                progress = 1;
            }
        } else if (!c->sp_len || c->sp_src == &u->in) {
            size_t add = buf_len(&u->in) - c->sp_len;
            if (add) {
                c->sp_src = &u->in;
                c->sp = NULL;
                c->sp_len += add;
                progress = 1;
            }
        }
        if (up_eof && buf_len(&u->in) == 0) {
            if (r->out_chunked)
                buf_append(&c->out, "0\r\n\r\n", 5);
            r->rs = RS_DONE;
            r->up_end_us = now_us();
            /* The connection ended the body: it cannot be reused. */
            upconn_close(c->up);
            c->up = NULL;
            return 1;
        }
        return progress;
    default:
        return 0;
    }
}

static int request_step(struct conn *c)
{
    struct request *r = &c->req;
    int progress = 0;
    if (r->rs == RS_BODY_WAIT) {
        if (r->replay.end == r->replay_len) {
            start_proxy(c);
            return 1;
        }
        if (c->eof) {
            client_gone(c);
            return 1;
        }
        return 0;
    }
    if (r->rs == RS_PAUSED) {
        if (c->eof) {
            client_gone(c); /* the arena's cleanups tell the filter */
            return 1;
        }
        if (!r->resume_pending)
            return 0;
        r->resume_pending = 0;
        enum filter_status st = filter_run_request(c);
        if (st == FILTER_PAUSED)
            return 1;
        if (st == FILTER_CONTINUE)
            request_dispatch(c);
        request_head_done(c);
        return 1;
    }
    if (r->rs == RS_LOCAL) {
        if (!r->head_consumed) {
            request_head_done(c); /* answered while paused */
            progress = 1;
        }
        /* Done once written: the log counts the bytes that went out (an
         * answer given while paused is committed here, not yet flushed). */
        if (out_pending(c) == 0) {
            r->rs = RS_DONE;
            progress = 1;
        }
    } else if (r->rs != RS_DONE && r->rs != RS_ABORT) {
        if (c->eof && (r->rb == RB_DONE || r->rb == RB_NONE || r->rb == RB_FLUSH)) {
            /* The client left while we waited on the upstream: cancel. */
            client_gone(c);
            return 1;
        }
        if (!c->up && r->resil.retry_at_ms)
            return 0; /* a retry waits for its backoff */
        progress |= upstream_connect_check(c);
        if (r->rs == RS_LOCAL || !c->up)
            return 1;
        progress |= request_body_feed(c);
        if (!c->up || c->dead || r->rs == RS_LOCAL)
            return 1;
        progress |= upstream_flush(c);
        if (!c->up || r->rs == RS_LOCAL)
            return 1;
        int eof = 0;
        progress |= upstream_read(c, &eof);
        if (eof)
            r->up_eof = eof;
        eof = r->up_eof;
        if (r->rs == RS_WAIT_HEAD) {
            if (buf_len(&c->up->in) == 0 && eof) {
                upstream_gone(c, 502, eof < 0 ? "connection reset" : "upstream closed without answering");
                return 1;
            }
            progress |= response_head(c);
            if (r->rs == RS_WAIT_HEAD && eof && c->up) {
                upstream_gone(c, 502, "upstream closed in the middle of the response head");
                return 1;
            }
            if (r->rs == RS_WAIT_HEAD && c->up && buf_len(&c->up->in) == c->up->in.cap) {
                upstream_gone(c, 502, "response head too large");
                return 1;
            }
        }
        if (c->up && r->rs != RS_WAIT_HEAD && r->rs != RS_LOCAL)
            progress |= response_body_feed(c, eof);
    }
    if (r->rs == RS_ABORT) {
        if (out_pending(c) == 0) {
            c->dead = 1;
            return 1;
        }
        return progress;
    }
    if (r->rs == RS_DONE && c->sp_len == 0) {
        /* The upstream answered before taking the whole body: the rest of
         * the body is still on the wire and cannot be told apart from a
         * next request. */
        if (r->rb != RB_DONE && r->rb != RB_NONE) {
            r->keepalive = 0;
            c->close_after = 1;
            c->linger_needed = 1;
        }
        request_finish(c);
        return 1;
    }
    return progress;
}

/* ---- closing ------------------------------------------------------------ */

static int linger_step(struct conn *c)
{
    if (out_pending(c))
        return 0;
    if (c->h2s) {
        c->dead = 1; /* the stream's end is h2.c's business */
        return 1;
    }
    if (!c->linger_needed && buf_len(&c->in) == 0) {
        c->dead = 1;
        return 1;
    }
    if (!c->linger_deadline_ms) {
        if (c->ssl) {
            tls_close(c->ssl); /* close_notify first */
            c->ssl = NULL;
        }
        shutdown(c->fd, SHUT_WR);
        c->linger_deadline_ms = worker_now_ms(c->w) + LINGER_MS;
        buf_free(&c->in);
        c->readable = 1;
        return 1;
    }
    if (c->eof) {
        c->dead = 1;
        return 1;
    }
    return 0;
}

/* ---- timeouts ----------------------------------------------------------- */

/* Keep-alive idle time allowed; shorter while draining (see conn_drain). */
static uint64_t idle_limit(const struct conn *c)
{
    const struct config_limits *l = limits(c);
    uint64_t idle = (uint64_t)l->idle_timeout_ms;
    if (worker_draining(c->w) && (uint64_t)l->drain_idle_ms < idle)
        idle = (uint64_t)l->drain_idle_ms;
    return idle;
}

static uint64_t min_nz(uint64_t a, uint64_t b) { return !a ? b : !b ? a : a < b ? a : b; }

static int grpc_waiting(const struct request *r)
{
    return r->grpc_deadline_ms && (r->rs == RS_WAIT_HEAD || r->rs == RS_BODY_WAIT);
}

static uint64_t body_deadline(const struct conn *c)
{
    const struct request *r = &c->req;
    const struct config_limits *l = limits(c);
    if ((r->rb != RB_LENGTH && r->rb != RB_CHUNKED) || buf_len(&c->in) >= c->in.cap ||
        r->rs == RS_LOCAL || r->rs == RS_PAUSED || r->rs == RS_DONE || r->rs == RS_ABORT)
        return 0;
    uint64_t d = r->rb_start_ms + (uint64_t)l->body_timeout_ms;
    if (l->body_min_rate)
        d += r->rb_total * 1000 / l->body_min_rate;
    return d;
}

static uint64_t upstream_deadline(const struct conn *c)
{
    const struct request *r = &c->req;
    if (!c->up && r->resil.retry_at_ms && r->rs == RS_WAIT_HEAD)
        return r->resil.retry_at_ms;
    if (!c->up || r->rs == RS_LOCAL || r->rs == RS_DONE || r->rs == RS_ABORT)
        return 0;
    if (c->up->state == UP_CONNECTING)
        return r->up_connect_deadline_ms;
    if (r->rs == RS_WAIT_HEAD && r->rb != RB_DONE && r->rb != RB_NONE) {
        /* Still sending the body: the body deadline covers a slow client;
         * an upstream that stops taking the body is timed here. */
        if (buf_len(&c->up->out) + c->up->span_len > 0 && !c->up->writable)
            return r->up_activity_ms + (uint64_t)r->route->upstream->timeout_ms;
        return 0;
    }
    if (r->rs != RS_WAIT_HEAD && buf_len(&c->up->in) >= c->up->in.cap)
        return 0; /* we are not reading: the client is slow, not the upstream */
    uint64_t d = r->up_activity_ms + (uint64_t)r->route->upstream->timeout_ms;
    return r->rs == RS_WAIT_HEAD ? min_nz(d, r->resil.try_deadline_ms) : d;
}

static uint64_t conn_deadline(const struct conn *c)
{
    const struct config_limits *l = limits(c);
    uint64_t d = 0;
    if (out_pending(c) && !c->writable)
        d = c->last_write_ms + (uint64_t)l->send_timeout_ms;
    switch (c->state) {
    case CS_HEAD:
        if (c->tls_hs)
            d = min_nz(d, c->accept_ms + (uint64_t)c->lc->tls_handshake_timeout_ms);
        else if (c->head_start_ms)
            d = min_nz(d, c->head_start_ms + (uint64_t)l->header_timeout_ms);
        else
            d = min_nz(d, c->idle_since_ms + idle_limit(c));
        break;
    case CS_REQUEST:
        d = min_nz(d, body_deadline(c));
        d = min_nz(d, upstream_deadline(c));
        if (grpc_waiting(&c->req))
            d = min_nz(d, c->req.grpc_deadline_ms);
        break;
    case CS_LINGER:
        d = min_nz(d, c->linger_deadline_ms);
        break;
    case CS_TUNNEL:
        d = min_nz(d, tunnel_deadline(c));
        break;
    case CS_H2:
        d = min_nz(d, h2_deadline(c));
        break;
    }
    return d;
}

/* Act on whatever deadline has passed. Returns 1 if something happened. */
/* The client's grpc-timeout passed before the answer's head:
 * DEADLINE_EXCEEDED (a local 504 is sent as grpc-status 4). The try ends
 * without a verdict on the endpoint (a client's short deadline says
 * nothing of its health) and is not retried. */
static void grpc_deadline_passed(struct conn *c)
{
    struct request *r = &c->req;
    if (c->up) {
        upconn_close(c->up);
        c->up = NULL;
    }
    if (r->up_start_us)
        r->up_end_us = now_us();
    resil_try_end(&r->resil);
    r->resil.retry_at_ms = 0;
    r->grpc_deadline_ms = 0;
    if (r->rb != RB_DONE && r->rb != RB_NONE)
        r->keepalive = 0;
    if (!r->keepalive)
        buf_consume(&c->in, buf_len(&c->in));
    respond_error(c, 504, NULL);
}

static int conn_timeouts(struct conn *c, uint64_t now)
{
    const struct config_limits *l = limits(c);
    struct request *r = &c->req;
    if (out_pending(c) && !c->writable && now >= c->last_write_ms + (uint64_t)l->send_timeout_ms) {
        log_debug("client %s: send timeout", c->peer_ip);
        if (r->status == 0)
            r->status = 499;
        c->dead = 1;
        return 1;
    }
    switch (c->state) {
    case CS_HEAD:
        if (c->tls_hs) {
            if (now < c->accept_ms + (uint64_t)c->lc->tls_handshake_timeout_ms)
                return 0;
            log_debug("client %s: TLS handshake timeout", c->peer_ip);
            metrics_add(&c->w->metrics, "portico_tls_handshakes_total", 1, "side", "client",
                        "result", "timeout", NULL, NULL);
            c->dead = 1;
            return 1;
        }
        if (c->head_start_ms && now >= c->head_start_ms + (uint64_t)l->header_timeout_ms) {
            r->keepalive = 0;
            r->method = "-";
            c->linger_needed = 1;
            buf_consume(&c->in, buf_len(&c->in));
            respond_error(c, 408, NULL);
            return 1;
        }
        if (!c->head_start_ms && now >= c->idle_since_ms + idle_limit(c)) {
            c->dead = 1;
            return 1;
        }
        return 0;
    case CS_REQUEST: {
        uint64_t bd = body_deadline(c);
        if (bd && now >= bd) {
            log_info("client %s: request body too slow (%" PRIu64 " bytes in %" PRIu64 " ms)",
                     c->peer_ip, r->rb_total, now - r->rb_start_ms);
            if (c->up) {
                upconn_close(c->up);
                c->up = NULL;
            }
            r->keepalive = 0;
            c->linger_needed = 1;
            buf_consume(&c->in, buf_len(&c->in));
            if (!r->resp_started)
                respond_error(c, 408, NULL);
            else
                c->dead = 1;
            return 1;
        }
        if (grpc_waiting(r) && now >= r->grpc_deadline_ms) {
            grpc_deadline_passed(c);
            return 1;
        }
        uint64_t ud = upstream_deadline(c);
        if (ud && now >= ud && !c->up && r->resil.retry_at_ms) {
            retry_now(c);
            return 1;
        }
        if (ud && now >= ud) {
            int connecting = c->up && c->up->state == UP_CONNECTING;
            upstream_gone(c, connecting ? 502 : 504, connecting ? "connect timeout" : "timeout");
            return 1;
        }
        return 0;
    }
    case CS_LINGER:
        if (c->linger_deadline_ms && now >= c->linger_deadline_ms) {
            c->dead = 1;
            return 1;
        }
        return 0;
    case CS_TUNNEL:
        return tunnel_timeouts(c, now);
    case CS_H2:
        return h2_timeouts(c, now);
    }
    return 0;
}

static void conn_arm_timer(struct conn *c)
{
    uint64_t d = conn_deadline(c);
    if (!d) {
        if (c->timer_at_ms) {
            event_del(&c->timer);
            c->timer_at_ms = 0;
        }
        return;
    }
    /* A timer that fires early is harmless (we re-check); re-arming on
     * every call is not free, so only move it earlier. */
    if (c->timer_at_ms && c->timer_at_ms <= d)
        return;
    uint64_t now = worker_now_ms(c->w);
    uint64_t wait = d > now ? d - now : 0;
    struct timeval tv = { (time_t)(wait / 1000), (suseconds_t)((wait % 1000) * 1000) };
    event_add(&c->timer, &tv);
    c->timer_at_ms = d;
}

/* ---- the pump ----------------------------------------------------------- */

/* Make every move possible until none is left: read, parse, relay, write.
 * All callbacks end here, and only here is a connection freed. */
static void conn_pump(struct conn *c)
{
    int progress, rounds = 0;
    if (!c->timer_at_ms || worker_now_ms(c->w) >= c->timer_at_ms) {
        c->timer_at_ms = 0;
        conn_timeouts(c, worker_now_ms(c->w));
    }
    do {
        progress = 0;
        if (c->dead)
            break;
        if (c->tls_hs) {
            progress |= conn_handshake(c);
            if (c->tls_hs || c->dead)
                continue;
        }
        progress |= client_read(c);
        switch (c->state) {
        case CS_HEAD:
            progress |= handle_head(c);
            break;
        case CS_REQUEST:
            progress |= request_step(c);
            break;
        case CS_LINGER:
            progress |= linger_step(c);
            break;
        case CS_TUNNEL:
            progress |= tunnel_step(c);
            break;
        case CS_H2:
            progress |= h2_step(c);
            break;
        }
        progress |= client_flush(c);
        /* Let other connections run now and then under a flood of
         * pipelined requests, or a tunnel whose both sides never rest. */
        if (++rounds > 256 &&
            (c->state == CS_HEAD || c->state == CS_TUNNEL || c->state == CS_H2)) {
            c->readable = 1;
            event_active(&c->ev, EV_READ, 0);
            break;
        }
    } while (progress && !c->dead);
    if (c->dead) {
        if (c->state == CS_TUNNEL)
            tunnel_end(c);
        if (c->req.method && c->req.status)
            request_log(c);
        conn_free(c);
        return;
    }
    if ((c->state == CS_HEAD || c->state == CS_H2) && !c->head_start_ms && buf_len(&c->in) == 0 &&
        out_pending(c) == 0) {
        /* Idle keep-alive: give the buffers back. */
        buf_release_if_empty(&c->in);
        buf_release_if_empty(&c->out);
    }
    conn_arm_timer(c);
}

struct conn *conn_stream_open(struct conn *p, struct h2_stream *st, const char *head, size_t len)
{
    struct worker *w = p->w;
    struct conn *c = xcalloc(1, sizeof(*c));
    c->w = w;
    c->ps = poolset_take(w);
    c->lc = p->lc;
    c->lc_cfg = config_ref(p->lc_cfg);
    const struct config_limits *l = &c->ps->cfg->limits;
    if (len > in_cap(l)) {
        poolset_put(w, c->ps);
        config_unref(c->lc_cfg);
        free(c);
        return NULL;
    }
    c->fd = -1;
    c->ssl = p->ssl; /* for what the request asks of TLS; never read or written here */
    c->tls_cert = 0;
    c->h2s = st;
    memcpy(&c->peer, &p->peer, sizeof(c->peer));
    memcpy(c->peer_ip, p->peer_ip, sizeof(c->peer_ip));
    conn_check_trusted(c);
    buf_init(&c->in, in_cap(l));
    buf_init(&c->out, out_cap(l));
    buf_append(&c->in, head, len);
    arena_init(&c->arena, 8192);
    c->req.arena = &c->arena;
    c->state = CS_HEAD;
    c->writable = 1;
    c->readable = 1;
    c->idle_since_ms = worker_now_ms(w);
    c->last_write_ms = c->idle_since_ms;
    c->accept_ms = c->idle_since_ms;
    event_assign(&c->ev, w->base, -1, 0, on_client_event, c); /* never added */
    event_assign(&c->timer, w->base, -1, 0, on_timer, c);
    request_reset(c);
    conn_schedule(c);
    return c;
}

int conn_trim_idle(struct conn *c, uint64_t idle_before_ms)
{
    if (c->state != CS_HEAD || c->tls_hs || c->head_start_ms || buf_len(&c->in) || out_pending(c) ||
        c->idle_since_ms > idle_before_ms || !c->req.head.headers)
        return 0;
    /* Nothing of a request lives in the arena between requests. */
    arena_destroy(&c->arena);
    arena_init(&c->arena, 8192);
    c->req.head.headers = NULL;
    return 1;
}

/* Draining. An idle keep-alive connection is not closed at once: a
 * client may be sending its next request right now, and a close would
 * fail it. It gets limits.drain_idle_ms more (its next answer says
 * "Connection: close"); one idle longer than that closes now. */
void conn_drain(struct conn *c)
{
    if (c->state == CS_H2) {
        h2_drain(c);
        return;
    }
    if (c->state == CS_HEAD && !c->head_start_ms && buf_len(&c->in) == 0) {
        if (worker_now_ms(c->w) >= c->idle_since_ms + idle_limit(c))
            c->dead = 1;
        conn_pump(c);
    } else if (!c->req.resp_started) {
        /* An answer already on its way keeps what its head promised. */
        c->req.keepalive = 0;
    }
}

void conn_abort(struct conn *c)
{
    c->dead = 1;
    conn_pump(c);
}
