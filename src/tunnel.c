/* WebSocket tunnels: see tunnel.h for the shape. conn.c hooks this file
 * at four points: the upgrade decision before proxying, the upstream's
 * 101, the pump and the timers of state TUNNEL. */
#include "tunnel.h"
#include "conn.h"
#include "log.h"
#include "metrics.h"
#include "module.h"
#include "upstream.h"
#include "worker.h"

#include <errno.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* Does some field called name list token (case-insensitive)? A protocol
 * version ("websocket/13") does not count as the token. */
static int fields_have_token(const struct http_header *h, size_t nh, const char *name,
                             const char *token)
{
    for (size_t i = 0; i < nh; i++)
        if (http_token_eq(h[i].name.p, h[i].name.len, name) &&
            http_list_has(h[i].value.p, h[i].value.len, token))
            return 1;
    return 0;
}

int tunnel_request_is_upgrade(const struct http_request *h)
{
    if (!h->has_upgrade || h->method != HTTP_M_GET || h->minor != 1 || h->chunked ||
        h->content_length > 0)
        return 0;
    return fields_have_token(h->headers, h->nheaders, "connection", "upgrade") &&
           fields_have_token(h->headers, h->nheaders, "upgrade", "websocket");
}

int tunnel_response_ok(const struct http_response *resp)
{
    return resp->status == 101 &&
           fields_have_token(resp->headers, resp->nheaders, "upgrade", "websocket");
}

void tunnel_begin(struct conn *c, size_t head_len)
{
    struct request *r = &c->req;
    uint64_t now = worker_now_ms(c->w);
    r->status = 101;
    proxy_build_response(c, &r->resp, HTTP_BODY_NONE);
    buf_consume(&c->up->in, head_len);
    r->resp_started = 1;
    r->rs = RS_TUNNEL;
    r->keepalive = 0;
    c->close_after = 1;
    r->tun_start_ms = now;
    r->tun_activity_ms = now;
    c->state = CS_TUNNEL;
    metrics_add(&c->w->metrics, "portico_websocket_tunnels_opened_total", 1, "route",
                r->route->name, NULL, NULL, NULL, NULL);
}

/* The tunnel cannot go on: the connection is freed at the end of the
 * pump (conn.c), closing both sockets. */
static int tunnel_fail(struct conn *c, const char *why)
{
    if (!c->req.tun_end)
        c->req.tun_end = why;
    c->dead = 1;
    return 1;
}

/* Client bytes (c->in) to the upstream socket, after whatever of the
 * request head u->out still holds (an upstream may answer 101 before it
 * has read all of it). */
static int up_write(struct conn *c)
{
    struct request *r = &c->req;
    struct upconn *u = c->up;
    struct iovec iov[2];
    int n = 0;
    if (buf_len(&u->out)) {
        iov[n].iov_base = buf_head(&u->out);
        iov[n++].iov_len = buf_len(&u->out);
    }
    if (buf_len(&c->in)) {
        iov[n].iov_base = buf_head(&c->in);
        iov[n++].iov_len = buf_len(&c->in);
    }
    size_t len = buf_len(&u->out) + buf_len(&c->in);
    if (!len || !u->writable || r->tun_up_shut)
        return 0;
    ssize_t wr = upconn_writev(u, iov, n);
    if (wr < 0) {
        if (errno == EAGAIN)
            return 0;
        if (errno == EINTR)
            return 1;
        log_debug("tunnel: upstream write: %s", strerror(errno));
        return tunnel_fail(c, "upstream_error");
    }
    size_t w = (size_t)wr, from_out = w < buf_len(&u->out) ? w : buf_len(&u->out);
    buf_consume(&u->out, from_out);
    buf_consume(&c->in, w - from_out);
    r->tun_activity_ms = worker_now_ms(c->w);
    return 1;
}

/* Upstream bytes into u->in, while it has room. */
static int up_read(struct conn *c)
{
    struct request *r = &c->req;
    struct upconn *u = c->up;
    if (!u->readable || r->tun_up_eof)
        return 0;
    size_t space = buf_make_room(&u->in);
    if (space == 0)
        return 0;
    ssize_t n = upconn_read(u, u->in.data + u->in.end, space);
    if (n < 0) {
        if (errno == EAGAIN)
            return 0;
        if (errno == EINTR)
            return 1;
        log_debug("tunnel: upstream read: %s", strerror(errno));
        return tunnel_fail(c, "upstream_error");
    }
    if (n == 0) {
        r->tun_up_eof = 1;
        u->readable = 0;
        return 1;
    }
    u->in.end += (size_t)n;
    r->tun_activity_ms = worker_now_ms(c->w);
    return 1;
}

/* Upstream bytes waiting in u->in go to the client behind c->out. */
static void span_sync(struct conn *c)
{
    struct upconn *u = c->up;
    if (buf_len(&u->in) > c->sp_len) {
        c->sp = NULL;
        c->sp_src = &u->in;
        c->sp_len = buf_len(&u->in);
    }
}

/* Our side of one direction is done: close_notify for TLS, then FIN. */
static void shut_write(int fd, SSL *ssl)
{
    if (ssl)
        tls_shutdown_write(ssl);
    shutdown(fd, SHUT_WR);
}

int tunnel_step(struct conn *c)
{
    struct request *r = &c->req;
    struct upconn *u = c->up;
    int progress = 0;
    if (!u)
        return tunnel_fail(c, "upstream_error");
    uint64_t seen = r->bytes_in + r->bytes_out;
    if (seen != r->tun_client_bytes) {
        /* client_read / client_flush (conn.c) moved bytes */
        r->tun_client_bytes = seen;
        r->tun_activity_ms = worker_now_ms(c->w);
    }
    progress |= up_write(c);
    if (c->dead)
        return 1;
    progress |= up_read(c);
    if (c->dead)
        return 1;
    span_sync(c);
    if (c->eof && !r->tun_up_shut && buf_len(&c->in) == 0 && buf_len(&u->out) == 0) {
        shut_write(u->fd, u->ssl);
        r->tun_up_shut = 1;
        if (!r->tun_end)
            r->tun_end = "client_closed";
        progress = 1;
    }
    if (r->tun_up_eof && !r->tun_client_shut && buf_len(&u->in) == 0 && buf_len(&c->out) == 0 &&
        c->sp_len == 0) {
        shut_write(c->fd, c->ssl);
        r->tun_client_shut = 1;
        if (!r->tun_end)
            r->tun_end = "upstream_closed";
        progress = 1;
    }
    if (r->tun_up_shut && r->tun_client_shut) {
        c->dead = 1;
        return 1;
    }
    /* A quiet tunnel holds no buffers: empty ones go back to the worker's
     * cache and are taken again with the next bytes (nothing points into
     * them: the request head was forwarded, the 101 head consumed). */
    buf_release_if_empty(&c->in);
    buf_release_if_empty(&u->in);
    buf_release_if_empty(&u->out);
    if (c->sp_len == 0)
        buf_release_if_empty(&c->out);
    return progress;
}

uint64_t tunnel_deadline(const struct conn *c)
{
    const struct request *r = &c->req;
    const struct config_route *rt = r->route;
    uint64_t d = r->tun_activity_ms + (uint64_t)rt->websocket_idle_timeout_ms;
    if (rt->websocket_max_lifetime_ms) {
        uint64_t life = r->tun_start_ms + (uint64_t)rt->websocket_max_lifetime_ms;
        if (life < d)
            d = life;
    }
    return d;
}

int tunnel_timeouts(struct conn *c, uint64_t now)
{
    const struct request *r = &c->req;
    const struct config_route *rt = r->route;
    if (rt->websocket_max_lifetime_ms &&
        now >= r->tun_start_ms + (uint64_t)rt->websocket_max_lifetime_ms) {
        log_debug("client %s: tunnel reached its maximum lifetime", c->peer_ip);
        return tunnel_fail(c, "max_lifetime");
    }
    if (now >= r->tun_activity_ms + (uint64_t)rt->websocket_idle_timeout_ms) {
        log_debug("client %s: tunnel idle timeout", c->peer_ip);
        return tunnel_fail(c, "idle_timeout");
    }
    return 0;
}

void tunnel_end(struct conn *c)
{
    struct request *r = &c->req;
    r->up_end_us = now_us();
    /* Ended outside tunnel_step: conn.c's send timeout, a failed client
     * write, or a stopping worker. */
    if (!r->tun_end) {
        if (worker_draining(c->w))
            r->tun_end = "shutdown";
        else if (buf_len(&c->out) + c->sp_len && !c->writable)
            r->tun_end = "send_timeout";
        else
            r->tun_end = "client_closed";
    }
    request_log_field(r, "tunnel_end", r->tun_end);
    metrics_add(&c->w->metrics, "portico_websocket_tunnels_closed_total", 1, "route",
                r->route->name, "reason", r->tun_end, NULL, NULL);
}
