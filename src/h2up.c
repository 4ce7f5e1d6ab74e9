/* HTTP/2 to upstreams: see h2up.h. */
#include <errno.h>
#include <nghttp2/nghttp2.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "conn.h"
#include "h2up.h"
#include "log.h"
#include "tls.h"
#include "upstream.h"
#include "worker.h"

enum rq_state { RQ_HEAD, RQ_LENGTH, RQ_CHUNKED, RQ_DONE };

struct h2up {
    nghttp2_session *ng;
    struct buf wire;   /* frames not yet on the socket */
    struct buf body;   /* request body bytes for the data provider */
    struct buf pend;   /* HTTP/1.1 response bytes waiting for room in u->in */
    size_t unconsumed; /* DATA bytes received, window not reopened yet */
    int32_t sid;       /* the stream of the request in flight, 0 none */
    enum rq_state rq;
    uint64_t rq_left;
    struct http_chunked rq_ch;
    int status; /* of the response head being read */
    unsigned deferred : 1, head_out : 1, ended : 1, reset : 1, broken : 1, is_head : 1;
    unsigned chunked_out : 1;
};

static struct h2up *session_of(struct upconn *u)
{
    return u->h2;
}

static size_t room(const struct buf *b)
{
    return b->cap - buf_len(b);
}

/* Append to pend, growing it: the window bounds what the upstream sends. */
static void pend_put(struct h2up *h, const void *p, size_t n)
{
    if (room(&h->pend) < n) {
        size_t cap = h->pend.cap;
        while (cap - buf_len(&h->pend) < n)
            cap *= 2;
        struct buf nb;
        buf_init(&nb, cap);
        if (buf_len(&h->pend))
            buf_append(&nb, buf_head(&h->pend), buf_len(&h->pend));
        buf_free(&h->pend);
        h->pend = nb;
    }
    buf_append(&h->pend, p, n);
}

/* ---- callbacks: the response ------------------------------------------------ */

/* The response head is written to pend as its fields come; 1xx heads are
 * skipped; trailers are written after a "0" last-chunk line. */
static int on_begin_headers(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    struct h2up *h = ud;
    (void)ng;
    if (f->hd.type == NGHTTP2_HEADERS && f->hd.stream_id == h->sid && h->head_out)
        pend_put(h, "0\r\n", 3);
    return 0;
}

static int on_header(nghttp2_session *ng, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                     const uint8_t *value, size_t vlen, uint8_t flags, void *ud)
{
    struct h2up *h = ud;
    (void)ng, (void)flags;
    if (f->hd.stream_id != h->sid || f->hd.type != NGHTTP2_HEADERS)
        return 0;
    if (!h->head_out) {
        if (nlen == 7 && memcmp(name, ":status", 7) == 0) {
            int st = 0;
            for (size_t i = 0; i < vlen && i < 3; i++)
                st = st * 10 + (value[i] - '0');
            h->status = st;
            if (st < 200)
                return 0; /* 1xx: not relayed */
            char line[64];
            int n = snprintf(line, sizeof(line), "HTTP/1.1 %d %s\r\n", st, http_status_reason(st));
            pend_put(h, line, (size_t)n);
            return 0;
        }
        if (h->status < 200 || name[0] == ':' ||
            (nlen == 14 && memcmp(name, "content-length", 14) == 0))
            return 0; /* the body goes chunked */
    } else if (name[0] == ':') {
        return 0;
    }
    pend_put(h, name, nlen);
    pend_put(h, ": ", 2);
    pend_put(h, value, vlen);
    pend_put(h, "\r\n", 2);
    return 0;
}

static int on_frame_recv(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    struct h2up *h = ud;
    (void)ng;
    if (f->hd.type == NGHTTP2_GOAWAY) {
        h->broken = 1; /* no new request on this connection */
        if (h->sid > f->goaway.last_stream_id && !h->ended)
            h->reset = 1;
        return 0;
    }
    if (!h->sid || f->hd.stream_id != h->sid)
        return 0;
    int end = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    if (f->hd.type == NGHTTP2_HEADERS) {
        if (!h->head_out) {
            if (h->status < 200)
                return 0; /* an interim head */
            int bodiless = h->is_head || h->status == 204 || h->status == 304;
            if (bodiless)
                pend_put(h, "\r\n", 2);
            else if (end)
                pend_put(h, "Content-Length: 0\r\n\r\n", 21);
            else
                pend_put(h, "Transfer-Encoding: chunked\r\n\r\n", 30);
            h->head_out = 1;
            h->chunked_out = !bodiless && !end;
            h->ended = end;
        } else if (end) {
            pend_put(h, "\r\n", 2); /* the end of the trailer section */
            h->ended = 1;
        }
        return 0;
    }
    if (f->hd.type == NGHTTP2_DATA && end) {
        if (h->chunked_out)
            pend_put(h, "0\r\n\r\n", 5);
        h->ended = 1;
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *ud)
{
    struct h2up *h = ud;
    (void)flags;
    h->unconsumed += len;
    if (id != h->sid || !h->chunked_out) {
        nghttp2_session_consume(ng, id, len);
        h->unconsumed -= len;
        return 0;
    }
    char line[24];
    int n = snprintf(line, sizeof(line), "%zx\r\n", len);
    pend_put(h, line, (size_t)n);
    pend_put(h, data, len);
    pend_put(h, "\r\n", 2);
    return 0;
}

static int on_stream_close(nghttp2_session *ng, int32_t id, uint32_t code, void *ud)
{
    struct h2up *h = ud;
    (void)ng;
    if (id == h->sid && (!h->ended || code != NGHTTP2_NO_ERROR))
        h->reset = !h->ended;
    return 0;
}

static ssize_t read_body(nghttp2_session *ng, int32_t id, uint8_t *dst, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *ud)
{
    struct h2up *h = src->ptr;
    (void)ng, (void)id, (void)ud;
    size_t n = buf_len(&h->body);
    if (n > len)
        n = len;
    if (n) {
        memcpy(dst, buf_head(&h->body), n);
        buf_consume(&h->body, n);
    }
    if (!buf_len(&h->body) && h->rq == RQ_DONE) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        return (ssize_t)n;
    }
    if (n == 0) {
        h->deferred = 1;
        return NGHTTP2_ERR_DEFERRED;
    }
    return (ssize_t)n;
}

/* ---- the session ---------------------------------------------------------------- */

static struct h2up *session_new(struct upconn *u)
{
    struct h2up *h = xcalloc(1, sizeof(*h));
    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_option *opt;
    nghttp2_option_new(&opt);
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_peer_max_concurrent_streams(opt, 100);
    int rv = nghttp2_session_client_new2(&h->ng, cb, h, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cb);
    if (rv != 0)
        die("nghttp2_session_client_new2: %s", nghttp2_strerror(rv));
    nghttp2_settings_entry iv[] = { { NGHTTP2_SETTINGS_ENABLE_PUSH, 0 },
                                    { NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 65535 } };
    nghttp2_submit_settings(h->ng, NGHTTP2_FLAG_NONE, iv, 2);
    buf_init(&h->wire, 65536);
    buf_init(&h->body, 65536);
    buf_init(&h->pend, 16384);
    u->h2 = h;
    return h;
}

void h2up_free(struct upconn *u)
{
    struct h2up *h = session_of(u);
    if (!h)
        return;
    nghttp2_session_del(h->ng);
    buf_free(&h->wire);
    buf_free(&h->body);
    buf_free(&h->pend);
    free(h);
    u->h2 = NULL;
}

int h2up_reusable(struct upconn *u)
{
    struct h2up *h = session_of(u);
    if (!h || h->broken || h->reset || !h->ended || buf_len(&h->pend) || buf_len(&h->wire))
        return 0;
    h->sid = 0;
    h->rq = RQ_HEAD;
    h->head_out = h->ended = h->deferred = h->is_head = h->chunked_out = 0;
    h->status = 0;
    buf_consume(&h->body, buf_len(&h->body));
    return 1;
}

static int is_hop(const char *n, size_t len)
{
    return http_token_eq(n, len, "connection") || http_token_eq(n, len, "keep-alive") ||
           http_token_eq(n, len, "proxy-connection") ||
           http_token_eq(n, len, "transfer-encoding") || http_token_eq(n, len, "upgrade") ||
           http_token_eq(n, len, "te") || http_token_eq(n, len, "host");
}

/* The request head at the front of u->out: submit it. 1 done, 0 wait, -1 bad. */
static int submit_head(struct conn *c, struct upconn *u, struct h2up *h)
{
    const struct config_limits *l = &c->ps->cfg->limits;
    struct http_header hs[l->max_headers + 16];
    struct http_request req = { .headers = hs, .max_headers_cap = l->max_headers + 16 };
    struct http_parse_limits pl = { .max_head_bytes = u->out.cap,
                                    .max_headers = l->max_headers + 16,
                                    .max_target_bytes = u->out.cap };
    size_t scanned = 0;
    int rc = http_parse_request(buf_head(&u->out), buf_len(&u->out), &scanned, &pl, &req);
    if (rc <= 0)
        return rc == 0 ? 0 : -1;
    nghttp2_nv nva[req.nheaders + 5];
    size_t n = 0;
#define NV(a, al, b, bl) nva[n++] = (nghttp2_nv){ (uint8_t *)(a), (uint8_t *)(b), al, bl, 0 }
    NV(":method", 7, req.method_str.p, req.method_str.len);
    NV(":scheme", 7, u->ssl ? "https" : "http", u->ssl ? 5 : 4);
    NV(":authority", 10, req.host.p, req.host.len);
    NV(":path", 5, req.target.p, req.target.len);
    NV("te", 2, "trailers", 8);
    for (size_t i = 0; i < req.nheaders; i++) {
        struct http_header *f = &hs[i];
        if (is_hop(f->name.p, f->name.len))
            continue;
        char *nm = (char *)f->name.p; /* our own bytes in u->out */
        for (size_t k = 0; k < f->name.len; k++)
            if (nm[k] >= 'A' && nm[k] <= 'Z')
                nm[k] = (char)(nm[k] + 32);
        NV(f->name.p, f->name.len, f->value.p, f->value.len);
    }
#undef NV
    h->is_head = req.method == HTTP_M_HEAD;
    h->rq = req.chunked ? RQ_CHUNKED : req.content_length > 0 ? RQ_LENGTH : RQ_DONE;
    h->rq_left = req.content_length > 0 ? (uint64_t)req.content_length : 0;
    if (h->rq == RQ_CHUNKED)
        http_chunked_init(&h->rq_ch);
    nghttp2_data_provider dp = { .source.ptr = h, .read_callback = read_body };
    int32_t sid = nghttp2_submit_request(h->ng, NULL, nva, n, h->rq == RQ_DONE ? NULL : &dp, NULL);
    if (sid < 0)
        return -1;
    h->sid = sid;
    buf_consume(&u->out, (size_t)rc);
    return 1;
}

/* Move request body bytes from u->out, then its span, into h->body. */
static int take_body(struct upconn *u, struct h2up *h)
{
    int progress = 0;
    for (int pass = 0; pass < 2 && h->rq != RQ_DONE; pass++) {
        struct buf *src = pass == 0 ? &u->out : u->span_src;
        size_t avail = pass == 0 ? buf_len(&u->out) : u->span_len;
        if (pass == 1 && buf_len(&u->out))
            break; /* the span follows out: out first */
        while (avail && h->rq != RQ_DONE && room(&h->body) > 64) {
            size_t used = 0;
            if (h->rq == RQ_LENGTH) {
                used = avail < room(&h->body) ? avail : room(&h->body);
                if (used > h->rq_left)
                    used = (size_t)h->rq_left;
                buf_append(&h->body, buf_head(src), used);
                if ((h->rq_left -= used) == 0)
                    h->rq = RQ_DONE;
            } else {
                size_t view = avail < room(&h->body) ? avail : room(&h->body);
                const char *data;
                size_t dlen;
                int rc = http_chunked_decode(&h->rq_ch, buf_head(src), view, &used, &data, &dlen);
                if (rc == HTTP_CHUNK_ERROR)
                    return -1;
                if (rc == HTTP_CHUNK_DATA)
                    buf_append(&h->body, data, dlen);
                else if (rc == HTTP_CHUNK_DONE)
                    h->rq = RQ_DONE;
                if (rc == HTTP_CHUNK_MORE && used == 0)
                    avail = 0;
            }
            buf_consume(src, used);
            if (pass == 1)
                u->span_len -= used;
            avail -= used;
            if (used)
                progress = 1;
        }
    }
    if (u->span_len == 0)
        u->span_src = NULL;
    if (h->deferred && (buf_len(&h->body) || h->rq == RQ_DONE)) {
        h->deferred = 0;
        nghttp2_session_resume_data(h->ng, h->sid);
    }
    return progress;
}

int h2up_flush(struct conn *c, struct upconn *u)
{
    struct h2up *h = session_of(u) ? session_of(u) : session_new(u);
    int progress = 0;
    if (c->req.up_write_failed)
        return 0;
    if (!h->sid && buf_len(&u->out)) {
        int rc = submit_head(c, u, h);
        if (rc < 0) {
            c->req.up_write_failed = 1;
            h->broken = 1;
            return 1;
        }
        progress |= rc;
    }
    if (h->sid) {
        int rc = take_body(u, h);
        if (rc < 0) {
            c->req.up_write_failed = 1;
            h->broken = 1;
            return 1;
        }
        progress |= rc;
    }
    while (room(&h->wire) >= 16384 + 64) {
        const uint8_t *p;
        ssize_t n = nghttp2_session_mem_send(h->ng, &p);
        if (n <= 0)
            break;
        if ((size_t)n > room(&h->wire)) {
            /* a frame larger than the room left: grow once for it */
            struct buf nb;
            buf_init(&nb, buf_len(&h->wire) + (size_t)n);
            if (buf_len(&h->wire))
                buf_append(&nb, buf_head(&h->wire), buf_len(&h->wire));
            buf_free(&h->wire);
            h->wire = nb;
        }
        buf_append(&h->wire, p, (size_t)n);
    }
    if (!u->writable || !buf_len(&h->wire))
        return progress;
    struct iovec iov = { buf_head(&h->wire), buf_len(&h->wire) };
    ssize_t wr = upconn_writev(u, &iov, 1);
    if (wr < 0) {
        if (errno == EAGAIN)
            return progress;
        if (errno == EINTR)
            return 1;
        log_debug("upstream HTTP/2 write: %s", strerror(errno));
        c->req.up_write_failed = 1;
        h->broken = 1;
        u->readable = 1;
        return 1;
    }
    buf_consume(&h->wire, (size_t)wr);
    c->req.up_activity_ms = worker_now_ms(c->w);
    return 1;
}

/* pend -> u->in, and reopen the window once pend is empty. */
static int deliver(struct upconn *u, struct h2up *h)
{
    size_t n = buf_len(&h->pend);
    if (!n)
        return 0;
    size_t space = buf_make_room(&u->in);
    if (n > space)
        n = space;
    if (!n)
        return 0;
    buf_append(&u->in, buf_head(&h->pend), n);
    buf_consume(&h->pend, n);
    if (!buf_len(&h->pend) && h->unconsumed) {
        if (!h->sid || nghttp2_session_consume(h->ng, h->sid, h->unconsumed) != 0)
            nghttp2_session_consume_connection(h->ng, h->unconsumed);
        h->unconsumed = 0;
    }
    return 1;
}

int h2up_read(struct conn *c, struct upconn *u, int *eof)
{
    struct h2up *h = session_of(u) ? session_of(u) : session_new(u);
    *eof = 0;
    int progress = deliver(u, h);
    if (buf_len(&h->pend))
        return progress; /* the client side is slow: the window holds the upstream */
    if (h->reset && !h->ended) {
        *eof = -1;
        return 1;
    }
    if (!u->readable)
        return progress;
    char tmp[16384];
    ssize_t n = upconn_read(u, tmp, sizeof(tmp));
    if (n < 0 && errno == EAGAIN)
        return progress;
    if (n < 0 && errno == EINTR)
        return 1;
    if (n <= 0) {
        u->readable = 0;
        h->broken = 1;
        *eof = n < 0 || !h->ended ? -1 : 1;
        return 1;
    }
    c->req.up_activity_ms = worker_now_ms(c->w);
    ssize_t rv = nghttp2_session_mem_recv(h->ng, (const uint8_t *)tmp, (size_t)n);
    if (rv < 0) {
        log_debug("upstream HTTP/2: %s", nghttp2_strerror((int)rv));
        h->broken = 1;
        if (!h->ended)
            h->reset = 1;
    }
    deliver(u, h);
    if (h->reset && !h->ended)
        *eof = -1;
    return 1;
}
