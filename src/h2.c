/* HTTP/2 sessions and their streams: see h2.h for the shape.
 *
 * Ownership: the session belongs to its conn (c->h2) and dies with it
 * (h2_free ends every stream's conn first). A stream belongs to the
 * session; it lives until nghttp2 has closed it and its conn is gone,
 * whichever comes last. nghttp2 calls back only from h2_step (frames in
 * and out); a stream's conn runs from its own events and only schedules
 * the session's conn, so neither frees the other from inside a callback. */
#include <nghttp2/nghttp2.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>

#include "conn.h"
#include "h2.h"
#include "log.h"
#include "metrics.h"
#include "worker.h"

enum out_state { OUT_HEAD, OUT_LENGTH, OUT_CHUNKED, OUT_CLOSE, OUT_DONE };

struct h2_field {
    struct h2_field *next;
    const char *name, *value;
    size_t name_len, value_len;
};

struct h2_stream {
    struct h2_session *s;
    struct h2_stream *prev, *next;
    int32_t id;
    struct conn *sc;    /* its conn; NULL before and after */
    struct arena arena; /* fields and trailers */
    /* request */
    struct h2_field *fields, **fields_tail;
    size_t nfields, field_bytes;
    const char *method, *path, *authority;
    size_t method_len, path_len, authority_len;
    struct buf pend; /* DATA the conn has not taken yet */
    unsigned too_large : 1, has_length : 1, chunked_in : 1, final_chunk : 1, req_ended : 1;
    unsigned is_head : 1;
    /* response */
    enum out_state out;
    struct buf raw;  /* the conn's HTTP/1.1, not yet parsed */
    struct buf body; /* body bytes waiting for the peer's window */
    uint64_t out_left;
    struct http_chunked ch;
    struct http_response resp;
    size_t resp_scanned;
    nghttp2_nv *trailers;
    size_t ntrailers;
    unsigned submitted : 1, deferred : 1, complete : 1, closed : 1, reset : 1, failed : 1;
    unsigned sc_gone : 1; /* its conn wrote all it will write */
};

struct h2_session {
    struct conn *c;
    nghttp2_session *ng;
    struct config_http2 lim; /* copied: the conn keeps its config */
    size_t max_field_bytes, max_fields, max_head;
    struct h2_stream *streams;
    unsigned live; /* streams not yet closed or with a conn */
    uint64_t requests;
    uint64_t idle_since_ms;
    uint64_t ctl_start_ms, rst_tokens_ms;
    unsigned ctl_count, empty_run;
    int32_t heading_id;  /* a header block is being received ... */
    uint64_t heading_ms; /* ... since then (limits.header_timeout_ms) */
    double rst_tokens;
    unsigned goaway : 1, calm : 1, fatal : 1, dying : 1;
};

/* ---- helpers ------------------------------------------------------------ */

static uint64_t now_ms(const struct h2_session *s)
{
    return worker_now_ms(s->c->w);
}

static void wake_session(struct h2_session *s)
{
    if (!s->dying)
        conn_schedule(s->c);
}

static void wake_conn(struct conn *sc)
{
    if (sc)
        conn_schedule(sc);
}

static void stream_free(struct h2_stream *st)
{
    struct h2_session *s = st->s;
    if (st->prev)
        st->prev->next = st->next;
    else
        s->streams = st->next;
    if (st->next)
        st->next->prev = st->prev;
    if (!s->dying) {
        if (!st->closed)
            nghttp2_session_set_stream_user_data(s->ng, st->id, NULL);
        /* DATA nobody will take still counts against the connection's
         * window: give it back, or the connection stalls. */
        if (buf_len(&st->pend))
            nghttp2_session_consume_connection(s->ng, buf_len(&st->pend));
        if (s->heading_id == st->id)
            s->heading_id = 0;
    }
    buf_free(&st->pend);
    buf_free(&st->raw);
    buf_free(&st->body);
    arena_destroy(&st->arena);
    s->live--;
    if (!s->live)
        s->idle_since_ms = now_ms(s);
    free(st);
}

static void stream_reset(struct h2_stream *st, uint32_t code)
{
    if (st->closed || st->failed)
        return;
    st->failed = 1;
    nghttp2_submit_rst_stream(st->s->ng, NGHTTP2_FLAG_NONE, st->id, code);
    wake_session(st->s);
}

/* Too much of something from this client: GOAWAY and stop listening. */
static void flood(struct h2_session *s, const char *kind)
{
    if (s->calm)
        return;
    s->calm = 1;
    log_info("client %s: HTTP/2 %s flood: GOAWAY (ENHANCE_YOUR_CALM)", s->c->peer_ip, kind);
    metrics_add(&s->c->w->metrics, "portico_http2_floods_total", 1, "kind", kind, NULL, NULL, NULL,
                NULL);
    nghttp2_session_terminate_session(s->ng, NGHTTP2_ENHANCE_YOUR_CALM);
}

static void count_control(struct h2_session *s)
{
    uint64_t now = now_ms(s);
    if (now - s->ctl_start_ms >= 1000) {
        s->ctl_start_ms = now;
        s->ctl_count = 0;
    }
    if (++s->ctl_count > (unsigned)s->lim.max_control_frames_per_s)
        flood(s, "control_frames");
}

/* A token bucket: max_resets_per_s, up to reset_burst saved. */
static void count_reset(struct h2_session *s)
{
    uint64_t now = now_ms(s);
    s->rst_tokens += (double)(now - s->rst_tokens_ms) * s->lim.max_resets_per_s / 1000.0;
    if (s->rst_tokens > s->lim.reset_burst)
        s->rst_tokens = s->lim.reset_burst;
    s->rst_tokens_ms = now;
    if (s->rst_tokens < 1.0) {
        flood(s, "stream_resets");
        return;
    }
    s->rst_tokens -= 1.0;
}

static int has_bad_byte(const uint8_t *p, size_t n, int space_too)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] == '\r' || p[i] == '\n' || p[i] == 0 ||
            (space_too && (p[i] <= ' ' || p[i] == 0x7f)))
            return 1;
    return 0;
}

/* ---- the response: HTTP/1.1 from the stream's conn to frames ------------- */

static int is_h1_only(const char *n, size_t len)
{
    return http_token_eq(n, len, "connection") || http_token_eq(n, len, "keep-alive") ||
           http_token_eq(n, len, "proxy-connection") ||
           http_token_eq(n, len, "transfer-encoding") || http_token_eq(n, len, "upgrade") ||
           http_token_eq(n, len, "te");
}

static void lower(char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] >= 'A' && p[i] <= 'Z')
            p[i] = (char)(p[i] + 32);
}

static ssize_t read_body(nghttp2_session *ng, int32_t id, uint8_t *dst, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *ud);
static void out_decode(struct h2_stream *st);

/* The response head is at the front of st->raw (hlen bytes): submit it. */
static void submit_head(struct h2_stream *st, size_t hlen)
{
    struct h2_session *s = st->s;
    struct http_response *r = &st->resp;
    nghttp2_nv nva[r->nheaders + 1];
    char status[12];
    snprintf(status, sizeof(status), "%03d", r->status % 1000);
    size_t n = 0;
    nva[n++] = (nghttp2_nv){ (uint8_t *)":status", (uint8_t *)status, 7, 3, NGHTTP2_NV_FLAG_NONE };
    for (size_t i = 0; i < r->nheaders; i++) {
        struct http_header *h = &r->headers[i];
        if (is_h1_only(h->name.p, h->name.len))
            continue;
        lower((char *)h->name.p, h->name.len); /* our own bytes in st->raw */
        nva[n++] = (nghttp2_nv){ (uint8_t *)h->name.p, (uint8_t *)h->value.p, h->name.len,
                                 h->value.len, NGHTTP2_NV_FLAG_NONE };
    }
    enum http_body_kind kind = http_response_body_kind(r, st->is_head ? HTTP_M_HEAD : HTTP_M_GET);
    st->out = kind == HTTP_BODY_LENGTH    ? OUT_LENGTH
              : kind == HTTP_BODY_CHUNKED ? OUT_CHUNKED
              : kind == HTTP_BODY_NONE    ? OUT_DONE
                                          : OUT_CLOSE;
    st->out_left = kind == HTTP_BODY_LENGTH ? (uint64_t)r->content_length : 0;
    if (st->out == OUT_LENGTH && st->out_left == 0)
        st->out = OUT_DONE;
    if (st->out == OUT_CHUNKED)
        http_chunked_init(&st->ch);
    nghttp2_data_provider dp = { .source.ptr = st, .read_callback = read_body };
    /* nghttp2 copies the fields before we let go of st->raw. */
    int rv = nghttp2_submit_response(s->ng, st->id, nva, n, st->out == OUT_DONE ? NULL : &dp);
    buf_consume(&st->raw, hlen);
    st->submitted = 1;
    if (st->out == OUT_DONE)
        st->complete = 1;
    if (rv != 0)
        stream_reset(st, NGHTTP2_INTERNAL_ERROR);
    wake_session(s);
}

/* One trailer line "Name: value" of the chunked body, kept for the end. */
static void add_trailer(struct h2_stream *st, const char *line, size_t len)
{
    const char *colon = memchr(line, ':', len);
    if (!colon || st->ntrailers >= 64)
        return;
    size_t nl = (size_t)(colon - line);
    const char *v = colon + 1, *e = line + len;
    while (v < e && (*v == ' ' || *v == '\t'))
        v++;
    while (e > v && (e[-1] == ' ' || e[-1] == '\t'))
        e--;
    if (nl == 0 || is_h1_only(line, nl))
        return;
    if (!st->trailers)
        st->trailers = arena_alloc(&st->arena, 64 * sizeof(nghttp2_nv));
    char *name = arena_strndup(&st->arena, line, nl);
    lower(name, nl);
    st->trailers[st->ntrailers++] =
        (nghttp2_nv){ (uint8_t *)name, (uint8_t *)arena_strndup(&st->arena, v, (size_t)(e - v)), nl,
                      (size_t)(e - v), NGHTTP2_NV_FLAG_NONE };
}

static size_t room(const struct buf *b)
{
    return b->cap - buf_len(b);
}

/* Parse what the stream's conn wrote: head, then body into st->body. */
static void out_decode(struct h2_stream *st)
{
    struct h2_session *s = st->s;
    for (;;) {
        if (st->failed || st->closed)
            break;
        if (st->out == OUT_HEAD) {
            if (!buf_len(&st->raw))
                break;
            if (!st->resp.headers) {
                st->resp.max_headers_cap = s->max_fields + 8;
                st->resp.headers =
                    arena_alloc(&st->arena, sizeof(struct http_header) * st->resp.max_headers_cap);
            }
            struct http_parse_limits pl = { .max_head_bytes = st->raw.cap,
                                            .max_headers = st->resp.max_headers_cap,
                                            .max_target_bytes = st->raw.cap };
            buf_make_room(&st->raw);
            int rc = http_parse_response(buf_head(&st->raw), buf_len(&st->raw), &st->resp_scanned,
                                         &pl, &st->resp);
            if (rc == 0 && room(&st->raw) == 0)
                rc = -1;
            if (rc == 0)
                break;
            if (rc < 0) {
                log_error("HTTP/2 stream %d: cannot read our own response head: %s", st->id,
                          http_last_error());
                stream_reset(st, NGHTTP2_INTERNAL_ERROR);
                break;
            }
            if (st->resp.status < 200) {
                buf_consume(&st->raw, (size_t)rc);
                struct http_header *keep = st->resp.headers;
                size_t cap = st->resp.max_headers_cap;
                memset(&st->resp, 0, sizeof(st->resp));
                st->resp.headers = keep;
                st->resp.max_headers_cap = cap;
                st->resp_scanned = 0;
                continue;
            }
            submit_head(st, (size_t)rc);
            continue;
        }
        if (st->out == OUT_LENGTH || st->out == OUT_CLOSE) {
            size_t n = buf_len(&st->raw);
            if (n > room(&st->body))
                n = room(&st->body);
            if (st->out == OUT_LENGTH && n > st->out_left)
                n = (size_t)st->out_left;
            if (n == 0)
                break;
            buf_append(&st->body, buf_head(&st->raw), n);
            buf_consume(&st->raw, n);
            if (st->out == OUT_LENGTH && (st->out_left -= n) == 0) {
                st->out = OUT_DONE;
                st->complete = 1;
            }
        } else if (st->out == OUT_CHUNKED) {
            if (!buf_len(&st->raw) || room(&st->body) < 64)
                break;
            size_t view = buf_len(&st->raw), consumed = 0, dlen = 0;
            if (view > room(&st->body))
                view = room(&st->body);
            const char *data = NULL;
            int rc =
                http_chunked_decode(&st->ch, buf_head(&st->raw), view, &consumed, &data, &dlen);
            if (rc == HTTP_CHUNK_ERROR) {
                stream_reset(st, NGHTTP2_INTERNAL_ERROR);
                break;
            }
            if (rc == HTTP_CHUNK_DATA)
                buf_append(&st->body, data, dlen);
            else if (rc == HTTP_CHUNK_TRAILER)
                add_trailer(st, data, dlen);
            else if (rc == HTTP_CHUNK_DONE) {
                st->out = OUT_DONE;
                st->complete = 1;
            }
            buf_consume(&st->raw, consumed);
            if (rc == HTTP_CHUNK_MORE && consumed == 0)
                break;
        } else {
            buf_consume(&st->raw, buf_len(&st->raw)); /* nothing follows a complete answer */
            break;
        }
    }
    if (st->sc_gone && !st->complete && !buf_len(&st->raw) && !st->failed && !st->closed) {
        /* Everything its conn wrote is decoded and the answer is not whole. */
        if (st->out == OUT_CLOSE) {
            st->out = OUT_DONE; /* the end of the conn was the end of the body */
            st->complete = 1;
        } else {
            stream_reset(st, NGHTTP2_INTERNAL_ERROR); /* cut short: never a clean end */
        }
    }
    if (st->deferred && (buf_len(&st->body) || st->complete) && !st->failed && !st->closed) {
        st->deferred = 0;
        nghttp2_session_resume_data(s->ng, st->id);
        wake_session(s);
    }
    if (st->sc && !st->sc->writable && room(&st->raw)) {
        st->sc->writable = 1;
        wake_conn(st->sc);
    }
}

static ssize_t read_body(nghttp2_session *ng, int32_t id, uint8_t *dst, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *ud)
{
    struct h2_stream *st = src->ptr;
    (void)ng, (void)id, (void)ud;
    size_t n = buf_len(&st->body);
    if (n > len)
        n = len;
    if (n) {
        memcpy(dst, buf_head(&st->body), n);
        buf_consume(&st->body, n);
    }
    if (n)
        out_decode(st);
    if (buf_len(&st->body) == 0 && st->complete) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        if (st->ntrailers) {
            *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
            nghttp2_submit_trailer(st->s->ng, st->id, st->trailers, st->ntrailers);
        }
        return (ssize_t)n;
    }
    if (n == 0) {
        st->deferred = 1;
        return NGHTTP2_ERR_DEFERRED;
    }
    return (ssize_t)n;
}

/* A short answer of our own, for a stream that never got a conn. */
static void answer_local(struct h2_stream *st, int status)
{
    char body[96], len[24], code[12];
    int bl = snprintf(body, sizeof(body), "%s\n", http_status_reason(status));
    snprintf(len, sizeof(len), "%d", bl);
    snprintf(code, sizeof(code), "%03d", status);
    nghttp2_nv nva[] = {
        { (uint8_t *)":status", (uint8_t *)code, 7, 3, NGHTTP2_NV_FLAG_NONE },
        { (uint8_t *)"content-type", (uint8_t *)"text/plain", 12, 10, NGHTTP2_NV_FLAG_NONE },
        { (uint8_t *)"content-length", (uint8_t *)len, 14, strlen(len), NGHTTP2_NV_FLAG_NONE },
    };
    buf_append(&st->body, body, (size_t)bl);
    st->out = OUT_DONE;
    st->complete = 1;
    st->submitted = 1;
    nghttp2_data_provider dp = { .source.ptr = st, .read_callback = read_body };
    if (nghttp2_submit_response(st->s->ng, st->id, nva, 3, &dp) != 0)
        stream_reset(st, NGHTTP2_INTERNAL_ERROR);
    wake_session(st->s);
}

/* ---- the request: the stream's fields to an HTTP/1.1 head ---------------- */

static void put(char **p, const char *end, const char *s, size_t n)
{
    if (*p + n <= end)
        memcpy(*p, s, n);
    *p += n;
}

/* The head the stream's conn reads. Returns its length, or 0 when it would
 * not fit in cap (then the answer is 431). */
static size_t make_head(struct h2_stream *st, char *out, size_t cap, int *bad)
{
    char *p = out, *end = out + cap;
    const char *host = st->authority;
    size_t host_len = st->authority_len;
    *bad = 0;
    put(&p, end, st->method, st->method_len);
    put(&p, end, " ", 1);
    if (st->path)
        put(&p, end, st->path, st->path_len);
    else
        put(&p, end, st->authority, st->authority_len); /* CONNECT: refused as in HTTP/1.1 */
    put(&p, end, " HTTP/1.1\r\n", 11);
    for (struct h2_field *f = st->fields; f; f = f->next)
        if (http_token_eq(f->name, f->name_len, "host")) {
            /* RFC 9113 8.3.1: Host and :authority must name the same. */
            if (host && (f->value_len != host_len || strncasecmp(f->value, host, host_len) != 0))
                *bad = 1;
            if (!host) {
                host = f->value;
                host_len = f->value_len;
            }
        }
    if (host) {
        put(&p, end, "Host: ", 6);
        put(&p, end, host, host_len);
        put(&p, end, "\r\n", 2);
    }
    int cookies = 0;
    for (struct h2_field *f = st->fields; f; f = f->next) {
        if (http_token_eq(f->name, f->name_len, "host") ||
            http_token_eq(f->name, f->name_len, "expect"))
            continue; /* Host is above; HTTP/2 windows do what 100-continue did */
        if (http_token_eq(f->name, f->name_len, "cookie")) {
            cookies++;
            continue;
        }
        put(&p, end, f->name, f->name_len);
        put(&p, end, ": ", 2);
        put(&p, end, f->value, f->value_len);
        put(&p, end, "\r\n", 2);
    }
    if (cookies) {
        /* RFC 9113 8.2.3: the crumbs are one field again for HTTP/1.1. */
        put(&p, end, "Cookie: ", 8);
        int first = 1;
        for (struct h2_field *f = st->fields; f; f = f->next)
            if (http_token_eq(f->name, f->name_len, "cookie")) {
                if (!first)
                    put(&p, end, "; ", 2);
                first = 0;
                put(&p, end, f->value, f->value_len);
            }
        put(&p, end, "\r\n", 2);
    }
    return (size_t)(p - out) <= cap ? (size_t)(p - out) : 0;
}

/* ---- nghttp2 callbacks ----------------------------------------------------- */

static int on_begin_headers(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    struct h2_session *s = ud;
    if (f->hd.type != NGHTTP2_HEADERS)
        return 0;
    s->heading_id = f->hd.stream_id; /* until on_frame_recv has the whole block */
    s->heading_ms = now_ms(s);
    if (f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    struct h2_stream *st = xcalloc(1, sizeof(*st));
    st->s = s;
    st->id = f->hd.stream_id;
    arena_init(&st->arena, 2048);
    st->fields_tail = &st->fields;
    /* Before our SETTINGS are acknowledged the client may use the
     * protocol's default window. */
    buf_init(&st->pend,
             s->lim.initial_window_size > 65535 ? (size_t)s->lim.initial_window_size : 65535);
    buf_init(&st->raw, s->max_head);
    buf_init(&st->body, 16384);
    st->next = s->streams;
    if (s->streams)
        s->streams->prev = st;
    s->streams = st;
    s->live++;
    nghttp2_session_set_stream_user_data(ng, st->id, st);
    if (++s->requests >= (uint64_t)s->lim.max_requests && !s->goaway) {
        /* As keepalive_requests: this one is answered, the client opens
         * a new connection for the next. */
        s->goaway = 1;
        nghttp2_submit_goaway(ng, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_NO_ERROR, NULL, 0);
    }
    return 0;
}

static int on_header(nghttp2_session *ng, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                     const uint8_t *value, size_t vlen, uint8_t flags, void *ud)
{
    struct h2_session *s = ud;
    (void)flags;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0; /* request trailers are not passed on */
    struct h2_stream *st = nghttp2_session_get_stream_user_data(ng, f->hd.stream_id);
    if (!st || st->too_large)
        return 0;
    st->field_bytes += nlen + vlen + 32; /* RFC 9113 6.5.2's accounting */
    if (st->field_bytes > s->max_field_bytes || st->nfields >= s->max_fields) {
        st->too_large = 1;
        return 0;
    }
    /* nghttp2 checked the bytes already (RFC 9113 8.2.1); what becomes a
     * request line or a field line must be beyond doubt. */
    int pseudo = nlen > 0 && name[0] == ':';
    if (has_bad_byte(name, nlen, 1) || has_bad_byte(value, vlen, pseudo))
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    char *v = arena_strndup(&st->arena, (const char *)value, vlen);
    if (pseudo) {
        if (nlen == 7 && memcmp(name, ":method", 7) == 0) {
            st->method = v;
            st->method_len = vlen;
            st->is_head = vlen == 4 && memcmp(v, "HEAD", 4) == 0;
        } else if (nlen == 5 && memcmp(name, ":path", 5) == 0) {
            st->path = v;
            st->path_len = vlen;
        } else if (nlen == 10 && memcmp(name, ":authority", 10) == 0) {
            st->authority = v;
            st->authority_len = vlen;
        } else if (!(nlen == 7 && memcmp(name, ":scheme", 7) == 0)) {
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* :protocol: no extended CONNECT */
        }
        return 0;
    }
    if (nlen == 14 && memcmp(name, "content-length", 14) == 0)
        st->has_length = 1;
    struct h2_field *fl = arena_alloc(&st->arena, sizeof(*fl));
    fl->next = NULL;
    fl->name = arena_strndup(&st->arena, (const char *)name, nlen);
    fl->name_len = nlen;
    fl->value = v;
    fl->value_len = vlen;
    *st->fields_tail = fl;
    st->fields_tail = &fl->next;
    st->nfields++;
    return 0;
}

/* The header block is complete: give the stream a conn. */
static void stream_begin(struct h2_session *s, struct h2_stream *st, int end_stream)
{
    if (st->too_large) {
        answer_local(st, 431);
        return;
    }
    st->chunked_in = !end_stream && !st->has_length;
    st->req_ended = end_stream != 0;
    char head[s->max_head];
    int bad;
    size_t n = make_head(st, head, sizeof(head) - 32, &bad);
    if (bad) {
        answer_local(st, 400);
        return;
    }
    if (n == 0) {
        answer_local(st, 431);
        return;
    }
    if (st->chunked_in) {
        memcpy(head + n, "Transfer-Encoding: chunked\r\n", 28);
        n += 28;
    }
    memcpy(head + n, "\r\n", 2);
    n += 2;
    st->sc = conn_stream_open(s->c, st, head, n);
    if (!st->sc)
        answer_local(st, 431);
}

static int on_frame_recv(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    struct h2_session *s = ud;
    struct h2_stream *st =
        f->hd.stream_id ? nghttp2_session_get_stream_user_data(ng, f->hd.stream_id) : NULL;
    int end = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    switch (f->hd.type) {
    case NGHTTP2_HEADERS:
        if (s->heading_id == f->hd.stream_id)
            s->heading_id = 0;
        if (!st)
            break;
        if (f->headers.cat == NGHTTP2_HCAT_REQUEST)
            stream_begin(s, st, end);
        else if (end) {
            st->req_ended = 1;
            if (st->sc) {
                st->sc->readable = 1;
                wake_conn(st->sc);
            }
        }
        break;
    case NGHTTP2_DATA:
        if (st && end) {
            st->req_ended = 1;
            if (st->sc) {
                st->sc->readable = 1;
                wake_conn(st->sc);
            }
        }
        break;
    case NGHTTP2_SETTINGS:
    case NGHTTP2_PING:
        if (!(f->hd.flags & NGHTTP2_FLAG_ACK))
            count_control(s);
        break;
    case NGHTTP2_PRIORITY:
        count_control(s);
        break;
    case NGHTTP2_RST_STREAM:
        count_reset(s);
        break;
    }
    return 0;
}

static int on_begin_frame(nghttp2_session *ng, const nghttp2_frame_hd *hd, void *ud)
{
    struct h2_session *s = ud;
    (void)ng;
    int carrier =
        hd->type == NGHTTP2_DATA || hd->type == NGHTTP2_HEADERS || hd->type == NGHTTP2_CONTINUATION;
    if (carrier && hd->length == 0 && !(hd->flags & NGHTTP2_FLAG_END_STREAM)) {
        if (++s->empty_run > (unsigned)s->lim.max_empty_frames)
            flood(s, "empty_frames");
    } else if (hd->length > 0) {
        s->empty_run = 0;
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *ud)
{
    struct h2_session *s = ud;
    (void)flags;
    struct h2_stream *st = nghttp2_session_get_stream_user_data(ng, id);
    if (!st || !st->sc) {
        nghttp2_session_consume(ng, id, len); /* answered already: dropped */
        return 0;
    }
    if (!buf_can_append(&st->pend, len)) {
        /* More than the window we gave: nghttp2 counts windows, so only a
         * lie about it gets here. */
        stream_reset(st, NGHTTP2_FLOW_CONTROL_ERROR);
        nghttp2_session_consume(ng, id, len);
        return 0;
    }
    buf_append(&st->pend, data, len);
    st->sc->readable = 1;
    wake_conn(st->sc);
    (void)s;
    return 0;
}

static int on_stream_close(nghttp2_session *ng, int32_t id, uint32_t code, void *ud)
{
    struct h2_stream *st = nghttp2_session_get_stream_user_data(ng, id);
    (void)ud;
    if (!st)
        return 0;
    st->closed = 1;
    nghttp2_session_set_stream_user_data(ng, id, NULL);
    if (!st->sc) {
        stream_free(st);
        return 0;
    }
    if (!st->complete || code != NGHTTP2_NO_ERROR) {
        struct conn *sc = st->sc;
        st->reset = 1;
        sc->readable = 1;
        if (sc->state == CS_HEAD && !sc->req.method)
            sc->dead = 1; /* reset before its conn ran (rapid reset): nothing to undo */
        wake_conn(sc);
    }
    return 0;
}

static int on_frame_send(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
    (void)ud;
    /* RFC 9113 8.1: answered before the whole request came: tell the
     * client to stop sending it. */
    if ((f->hd.type == NGHTTP2_DATA || f->hd.type == NGHTTP2_HEADERS) &&
        (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        struct h2_stream *st = nghttp2_session_get_stream_user_data(ng, f->hd.stream_id);
        if (st && !st->req_ended)
            nghttp2_submit_rst_stream(ng, NGHTTP2_FLAG_NONE, f->hd.stream_id, NGHTTP2_NO_ERROR);
    }
    return 0;
}

static int on_error(nghttp2_session *ng, int code, const char *msg, size_t len, void *ud)
{
    struct h2_session *s = ud;
    (void)ng, (void)code;
    log_debug("client %s: HTTP/2: %.*s", s->c->peer_ip, (int)len, msg);
    return 0;
}

/* ---- the session ------------------------------------------------------------ */

int h2_start(struct conn *c)
{
    if (!c->ssl || !tls_conn_is_h2(c->ssl))
        return 0;
    const struct config *cfg = c->ps->cfg;
    struct h2_session *s = xcalloc(1, sizeof(*s));
    s->c = c;
    s->lim = cfg->http2;
    s->max_field_bytes = cfg->limits.max_header_bytes;
    s->max_fields = cfg->limits.max_headers;
    s->max_head = cfg->limits.max_header_bytes + 1024; /* as a conn's input buffer */
    s->idle_since_ms = worker_now_ms(c->w);
    s->ctl_start_ms = s->idle_since_ms;
    s->rst_tokens_ms = s->idle_since_ms;
    s->rst_tokens = s->lim.reset_burst;

    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
    nghttp2_session_callbacks_set_error_callback2(cb, on_error);
    nghttp2_option *opt;
    nghttp2_option_new(&opt);
    /* Windows open only as streams' conns take the bytes (h2_stream_read). */
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_no_closed_streams(opt, 1);
    nghttp2_option_set_max_continuations(opt, (size_t)s->lim.max_continuations);
    /* Ours (count_reset) acts first; nghttp2's is the backstop. */
    nghttp2_option_set_stream_reset_rate_limit(opt, (uint64_t)s->lim.reset_burst * 2,
                                               (uint64_t)s->lim.max_resets_per_s * 2);
    nghttp2_option_set_max_settings(opt, 32);
    int rv = nghttp2_session_server_new2(&s->ng, cb, s, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cb);
    if (rv != 0) {
        log_error("client %s: cannot start an HTTP/2 session: %s", c->peer_ip,
                  nghttp2_strerror(rv));
        free(s);
        c->dead = 1;
        return 1;
    }
    nghttp2_settings_entry iv[] = {
        { NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, (uint32_t)s->lim.max_concurrent_streams },
        { NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, (uint32_t)s->lim.initial_window_size },
        { NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, (uint32_t)s->max_field_bytes },
        { NGHTTP2_SETTINGS_ENABLE_PUSH, 0 },
    };
    nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0]));
    nghttp2_session_set_local_window_size(s->ng, NGHTTP2_FLAG_NONE, 0,
                                          s->lim.connection_window_size);
    c->h2 = s;
    c->state = CS_H2;
    metrics_add(&c->w->metrics, "portico_http2_sessions_total", 1, NULL, NULL, NULL, NULL, NULL,
                NULL);
    return 1;
}

int h2_step(struct conn *c)
{
    struct h2_session *s = c->h2;
    int progress = 0;
    if (buf_len(&c->in)) {
        if (s->calm || s->fatal) {
            buf_consume(&c->in, buf_len(&c->in)); /* we stopped listening */
        } else {
            ssize_t rv =
                nghttp2_session_mem_recv(s->ng, (const uint8_t *)buf_head(&c->in), buf_len(&c->in));
            if (rv < 0) {
                /* Fatal for the session: say so with a GOAWAY, then close. */
                log_debug("client %s: HTTP/2: %s", c->peer_ip, nghttp2_strerror((int)rv));
                if (rv == NGHTTP2_ERR_FLOODED)
                    flood(s, "queued_frames");
                else if (rv == NGHTTP2_ERR_TOO_MANY_CONTINUATIONS)
                    flood(s, "continuations");
                else
                    nghttp2_session_terminate_session(s->ng, NGHTTP2_PROTOCOL_ERROR);
                s->fatal = 1;
                buf_consume(&c->in, buf_len(&c->in));
            } else {
                buf_consume(&c->in, (size_t)rv);
            }
        }
        progress = 1;
    }
    /* Frames out: into c->out while it has room, the last one as the span
     * (nghttp2's buffer stays valid until the next mem_send). */
    while (!c->sp_len && buf_len(&c->out) < c->out.cap / 2) {
        const uint8_t *p;
        ssize_t n = nghttp2_session_mem_send(s->ng, &p);
        if (n < 0) {
            log_debug("client %s: HTTP/2: %s", c->peer_ip, nghttp2_strerror((int)n));
            s->fatal = 1;
            break;
        }
        if (n == 0)
            break;
        if (buf_can_append(&c->out, (size_t)n) && (size_t)n <= c->out.cap - buf_len(&c->out)) {
            buf_append(&c->out, p, (size_t)n);
        } else {
            c->sp = (const char *)p;
            c->sp_src = NULL;
            c->sp_len = (size_t)n;
        }
        progress = 1;
    }
    int pending = buf_len(&c->out) || c->sp_len;
    if (!pending && (s->fatal || c->eof ||
                     (!nghttp2_session_want_read(s->ng) && !nghttp2_session_want_write(s->ng)) ||
                     (s->goaway && !s->live))) {
        c->dead = 1;
        return 1;
    }
    if (c->eof && !pending)
        c->dead = 1;
    return progress;
}

uint64_t h2_deadline(const struct conn *c)
{
    const struct h2_session *s = c->h2;
    const struct config_limits *l = &c->ps->cfg->limits;
    /* A header block must arrive whole before any other frame, so at most
     * one is pending: a client that stops in the middle holds the
     * connection, and gets header_timeout_ms for it. */
    if (s->heading_id)
        return s->heading_ms + (uint64_t)l->header_timeout_ms;
    if (s->live)
        return 0;
    uint64_t idle = (uint64_t)l->idle_timeout_ms;
    if (worker_draining(c->w) && (uint64_t)l->drain_idle_ms < idle)
        idle = (uint64_t)l->drain_idle_ms;
    return s->idle_since_ms + idle;
}

int h2_timeouts(struct conn *c, uint64_t now)
{
    struct h2_session *s = c->h2;
    uint64_t d = h2_deadline(c);
    if (!d || now < d)
        return 0;
    if (s->heading_id) {
        log_debug("client %s: HTTP/2 header block timeout", c->peer_ip);
        s->heading_id = 0;
        s->goaway = 1;
        nghttp2_session_terminate_session(s->ng, NGHTTP2_NO_ERROR);
        return 1;
    }
    if (s->goaway)
        return 0;
    s->goaway = 1;
    nghttp2_submit_goaway(s->ng, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(s->ng),
                          NGHTTP2_NO_ERROR, NULL, 0);
    return 1;
}

void h2_drain(struct conn *c)
{
    struct h2_session *s = c->h2;
    if (!s->goaway) {
        s->goaway = 1;
        nghttp2_submit_goaway(s->ng, NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(s->ng), NGHTTP2_NO_ERROR,
                              NULL, 0);
    }
    conn_schedule(c);
}

void h2_free(struct conn *c)
{
    struct h2_session *s = c->h2;
    s->dying = 1;
    while (s->streams) {
        struct h2_stream *st = s->streams;
        if (st->sc)
            conn_abort(st->sc); /* frees it; h2_stream_gone frees st */
        else
            stream_free(st);
    }
    nghttp2_session_del(s->ng);
    free(s);
    c->h2 = NULL;
}

/* ---- a stream's conn ---------------------------------------------------------- */

int h2_stream_read(struct conn *c)
{
    struct h2_stream *st = c->h2s;
    struct h2_session *s = st->s;
    c->readable = 0;
    if (st->reset) {
        c->eof = 1;
        return 1;
    }
    if (c->req.rs == RS_PAUSED)
        return 0; /* the head stays put in c->in; bytes wait in st->pend */
    int progress = 0;
    size_t took = 0;
    while (buf_len(&st->pend)) {
        size_t space = buf_make_room(&c->in), n = buf_len(&st->pend);
        if (st->chunked_in) {
            if (space < 64)
                break;
            if (n > space - 32)
                n = space - 32;
            char line[24];
            int ll = snprintf(line, sizeof(line), "%zx\r\n", n);
            buf_append(&c->in, line, (size_t)ll);
            buf_append(&c->in, buf_head(&st->pend), n);
            buf_append(&c->in, "\r\n", 2);
        } else {
            if (space == 0)
                break;
            if (n > space)
                n = space;
            buf_append(&c->in, buf_head(&st->pend), n);
        }
        buf_consume(&st->pend, n);
        c->req.bytes_in += n;
        took += n;
        progress = 1;
    }
    if (took) {
        /* WINDOW_UPDATE goes out (the connection's even if the stream closed) */
        nghttp2_session_consume(s->ng, st->id, took);
        wake_session(s);
    }
    if (st->req_ended && st->chunked_in && !st->final_chunk && !buf_len(&st->pend) &&
        buf_make_room(&c->in) >= 5) {
        buf_append(&c->in, "0\r\n\r\n", 5);
        st->final_chunk = 1;
        progress = 1;
    }
    if (buf_len(&st->pend) || (st->req_ended && st->chunked_in && !st->final_chunk))
        c->readable = 1; /* more when c->in has room again */
    return progress;
}

ssize_t h2_stream_write(struct conn *c, const struct iovec *iov, int n)
{
    struct h2_stream *st = c->h2s;
    if (st->reset || st->closed || st->failed || st->s->dying)
        return -1;
    ssize_t took = 0;
    for (int i = 0; i < n; i++) {
        size_t space = buf_make_room(&st->raw), len = iov[i].iov_len;
        if (len > space)
            len = space;
        buf_append(&st->raw, iov[i].iov_base, len);
        took += (ssize_t)len;
        if (len < iov[i].iov_len)
            break;
    }
    out_decode(st);
    return took;
}

void h2_stream_gone(struct conn *c)
{
    struct h2_stream *st = c->h2s;
    struct h2_session *s = st->s;
    st->sc = NULL;
    c->h2s = NULL;
    if (s->dying || st->closed) {
        stream_free(st);
        return;
    }
    /* What it wrote may still wait in st->raw for the peer's window:
     * out_decode finishes the stream, cleanly or not, once that is done. */
    st->sc_gone = 1;
    out_decode(st);
    wake_session(s);
}
