/* The two heads the proxy writes: the request head for the upstream and
 * the response head for the client. Hop-by-hop fields are dropped both
 * ways, bodies are re-framed, and X-Forwarded-* is set, trusting what
 * the client sent only when it is a configured trusted proxy. */
#include "conn.h"
#include "worker.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

/* Field names the proxy never copies through: hop-by-hop ones (RFC 9110
 * section 7.6.1) and the framing fields it writes itself. */
int proxy_is_hop_by_hop(const char *n, size_t len)
{
    switch (len) {
    case 2:
        return http_token_eq(n, len, "te");
    case 7:
        return http_token_eq(n, len, "trailer") || http_token_eq(n, len, "upgrade");
    case 10:
        return http_token_eq(n, len, "connection") || http_token_eq(n, len, "keep-alive");
    case 14:
        /* HTTP2-Settings goes with an h2c upgrade, never forwarded */
        return http_token_eq(n, len, "content-length") || http_token_eq(n, len, "http2-settings");
    case 16:
        return http_token_eq(n, len, "proxy-connection");
    case 17:
        return http_token_eq(n, len, "transfer-encoding");
    }
    return 0;
}

#define MAX_CONN_TOKENS 32

struct conn_tokens {
    struct http_str t[MAX_CONN_TOKENS];
    int n;
    int overflow;
};

/* Collect the field names listed in Connection fields. */
static void connection_tokens(const struct http_header *h, size_t nh, struct conn_tokens *ct)
{
    ct->n = 0;
    ct->overflow = 0;
    for (size_t i = 0; i < nh; i++) {
        if (!http_token_eq(h[i].name.p, h[i].name.len, "connection"))
            continue;
        const char *p = h[i].value.p, *end = p + h[i].value.len;
        while (p < end) {
            while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
                p++;
            const char *s = p;
            while (p < end && *p != ',' && *p != ' ' && *p != '\t')
                p++;
            if (p > s) {
                if (ct->n < MAX_CONN_TOKENS)
                    ct->t[ct->n++] = (struct http_str){ s, (size_t)(p - s) };
                else
                    ct->overflow = 1;
            }
        }
    }
}

/* Is name listed in the Connection fields? Past MAX_CONN_TOKENS options
 * the fields themselves are searched again: every option counts. */
static int named_by_connection(const struct conn_tokens *ct, const struct http_str *name,
                               const struct http_header *h, size_t nh)
{
    for (int i = 0; i < ct->n; i++)
        if (ct->t[i].len == name->len && strncasecmp(ct->t[i].p, name->p, name->len) == 0)
            return 1;
    if (!ct->overflow)
        return 0;
    for (size_t i = 0; i < nh; i++) {
        if (!http_token_eq(h[i].name.p, h[i].name.len, "connection"))
            continue;
        const char *p = h[i].value.p, *end = p + h[i].value.len;
        while (p < end) {
            while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
                p++;
            const char *s = p;
            while (p < end && *p != ',' && *p != ' ' && *p != '\t')
                p++;
            if ((size_t)(p - s) == name->len && strncasecmp(s, name->p, name->len) == 0)
                return 1;
        }
    }
    return 0;
}

/* Names with '_' are dropped on the way upstream, as nginx does by default:
 * CGI/WSGI servers map '-' and '_' to the same variable, so X_Forwarded_For
 * could pass for the X-Forwarded-For we set. */
static int has_underscore(const struct http_str *n)
{
    return memchr(n->p, '_', n->len) != NULL;
}

static void put(struct buf *b, const char *s, size_t n) { buf_append(b, s, n); }
static void puts_(struct buf *b, const char *s) { buf_append(b, s, strlen(s)); }

/* Decimal digits of v, by hand: snprintf cost 10% of a proxied request. */
static void put_uint(struct buf *b, uint64_t v)
{
    char d[20];
    size_t i = sizeof(d);
    do
        d[--i] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    buf_append(b, d + i, sizeof(d) - i);
}

static void put_content_length(struct buf *b, uint64_t v)
{
    buf_append(b, "Content-Length: ", 16);
    put_uint(b, v);
    buf_append(b, "\r\n", 2);
}

static void put_field(struct buf *b, const char *name, const char *v, size_t vlen)
{
    puts_(b, name);
    put(b, ": ", 2);
    put(b, v, vlen);
    put(b, "\r\n", 2);
}

enum fwd_field { F_NONE, F_XFF, F_XFPROTO, F_XFHOST, F_XFPREFIX, F_XREALIP, F_FORWARDED, F_HOST, F_EXPECT };

static enum fwd_field classify(const struct http_str *n)
{
    static const struct { const char *name; enum fwd_field f; } names[] = {
        { "host", F_HOST },
        { "expect", F_EXPECT },
        { "forwarded", F_FORWARDED },
        { "x-real-ip", F_XREALIP },
        { "x-forwarded-for", F_XFF },
        { "x-forwarded-host", F_XFHOST },
        { "x-forwarded-proto", F_XFPROTO },
        { "x-forwarded-prefix", F_XFPREFIX },
    };
    /* Cheap reject: every name here starts with h, e, f or x. */
    char c0 = (char)(n->p[0] | 0x20);
    if (c0 != 'h' && c0 != 'e' && c0 != 'f' && c0 != 'x')
        return F_NONE;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strlen(names[i].name) == n->len && http_token_eq(n->p, n->len, names[i].name))
            return names[i].f;
    return F_NONE;
}

static int name_is(const struct http_str *n, const char *want)
{
    return want && strlen(want) == n->len && strncasecmp(n->p, want, n->len) == 0;
}

/* The verified client certificate's headers (mTLS listeners). The first
 * use on a connection looks at the certificate; later requests reuse it. */
static void client_cert_headers(struct conn *c, struct buf *out)
{
    const struct config_listener *lc = c->lc;
    if (!c->ssl)
        return;
    if (c->tls_cert == 0)
        c->tls_cert = tls_conn_client_cert(c->ssl, &c->tls_subject, &c->tls_fp) == 0 ? 1 : -1;
    if (c->tls_cert != 1)
        return;
    const struct header_edit *ed = c->req.req_edits;
    if (lc->client_subject_header &&
        !(ed &&
          filter_edits_drop(ed, lc->client_subject_header, strlen(lc->client_subject_header)))) {
        size_t n = strlen(c->tls_subject);
        put_field(out, lc->client_subject_header, c->tls_subject, n > 1024 ? 1024 : n);
    }
    if (lc->client_fp_header &&
        !(ed && filter_edits_drop(ed, lc->client_fp_header, strlen(lc->client_fp_header))))
        put_field(out, lc->client_fp_header, c->tls_fp, strlen(c->tls_fp));
}

void proxy_build_request(struct conn *c, struct buf *out)
{
    struct request *r = &c->req;
    const struct http_request *h = &r->head;
    const struct config_route *rt = r->route;
    const struct config *cfg = c->ps->cfg;

    /* request-line: method, the normalised (and rewritten) path, query */
    put(out, h->method_str.p, h->method_str.len);
    put(out, " ", 1);
    const char *path = r->path;
    size_t plen = r->path_len;
    const char *prefix = NULL;
    size_t prefix_len = 0;
    if (rt->strip_prefix) {
        size_t sl = strlen(rt->strip_prefix);
        if (plen >= sl && memcmp(path, rt->strip_prefix, sl) == 0) {
            prefix = rt->strip_prefix;
            prefix_len = sl;
            /* keep X-Forwarded-Prefix without a trailing slash */
            while (prefix_len > 1 && prefix[prefix_len - 1] == '/')
                prefix_len--;
            path += sl;
            plen -= sl;
            if (plen == 0 || path[0] != '/') {
                put(out, "/", 1);
            }
        }
        put(out, path, plen);
    } else if (rt->prefix_rewrite && plen >= rt->path_len && !rt->exact) {
        puts_(out, rt->prefix_rewrite);
        put(out, path + rt->path_len, plen - rt->path_len);
        prefix = rt->path;
        prefix_len = rt->path_len;
        while (prefix_len > 1 && prefix[prefix_len - 1] == '/')
            prefix_len--;
    } else {
        put(out, path, plen);
    }
    if (r->query) {
        put(out, "?", 1);
        put(out, r->query, r->query_len);
    }
    put(out, " HTTP/1.1\r\n", 11);

    /* Host: the absolute-form authority wins over the Host field. */
    if (r->authority)
        put_field(out, "Host", r->authority, r->authority_len);
    else
        put_field(out, "Host", h->host.p, h->host.len);

    struct conn_tokens ct;
    connection_tokens(h->headers, h->nheaders, &ct);
    int trusted = c->trusted;
    const char *cert_subject = c->lc->client_subject_header, *cert_fp = c->lc->client_fp_header;
    int have_proto = 0, have_fhost = 0, have_realip = 0, xff_open = 0;
    for (size_t i = 0; i < h->nheaders; i++) {
        const struct http_header *f = &h->headers[i];
        if (proxy_is_hop_by_hop(f->name.p, f->name.len) || has_underscore(&f->name) ||
            named_by_connection(&ct, &f->name, h->headers, h->nheaders))
            continue;
        if (r->req_edits && filter_edits_drop(r->req_edits, f->name.p, f->name.len))
            continue;
        /* Only the verified certificate may fill these; never the client. */
        if ((cert_subject || cert_fp) &&
            (name_is(&f->name, cert_subject) || name_is(&f->name, cert_fp)))
            continue;
        switch (classify(&f->name)) {
        case F_HOST:
        case F_EXPECT:
            continue;
        case F_XFF:
            if (trusted) {
                /* fold every incoming X-Forwarded-For into one list */
                if (!xff_open) {
                    puts_(out, "X-Forwarded-For: ");
                    xff_open = 1;
                } else {
                    put(out, ", ", 2);
                }
                put(out, f->value.p, f->value.len);
            }
            continue;
        case F_XFPROTO:
            if (trusted && !have_proto) {
                put_field(out, "X-Forwarded-Proto", f->value.p, f->value.len);
                have_proto = 1;
            }
            continue;
        case F_XFHOST:
            if (trusted && !have_fhost) {
                put_field(out, "X-Forwarded-Host", f->value.p, f->value.len);
                have_fhost = 1;
            }
            continue;
        case F_XREALIP:
            if (trusted && !have_realip) {
                put_field(out, "X-Real-IP", f->value.p, f->value.len);
                have_realip = 1;
            }
            continue;
        case F_FORWARDED:
        case F_XFPREFIX:
            if (trusted && !(prefix && classify(&f->name) == F_XFPREFIX))
                put_field(out, f->name.len == 9 ? "Forwarded" : "X-Forwarded-Prefix", f->value.p,
                          f->value.len);
            continue;
        case F_NONE:
            break;
        }
        put(out, f->name.p, f->name.len);
        put(out, ": ", 2);
        put(out, f->value.p, f->value.len);
        put(out, "\r\n", 2);
    }
    /* Our forwarding headers, unless a filter set or removed them. */
    const struct header_edit *ed = r->req_edits;
#define OURS(name) (!ed || !filter_edits_drop(ed, name, sizeof(name) - 1))
    if (xff_open) {
        put(out, ", ", 2);
        puts_(out, c->peer_ip);
        put(out, "\r\n", 2);
    } else if (OURS("X-Forwarded-For")) {
        put_field(out, "X-Forwarded-For", c->peer_ip, strlen(c->peer_ip));
    }
    if (!have_proto && OURS("X-Forwarded-Proto"))
        put_field(out, "X-Forwarded-Proto", c->ssl ? "https" : "http", c->ssl ? 5 : 4);
    if (!have_fhost && OURS("X-Forwarded-Host")) {
        if (r->authority)
            put_field(out, "X-Forwarded-Host", r->authority, r->authority_len);
        else
            put_field(out, "X-Forwarded-Host", h->host.p, h->host.len);
    }
    if (!have_realip && OURS("X-Real-IP"))
        put_field(out, "X-Real-IP", c->peer_ip, strlen(c->peer_ip));
    if (prefix && OURS("X-Forwarded-Prefix"))
        put_field(out, "X-Forwarded-Prefix", prefix, prefix_len);
    if (cert_subject || cert_fp)
        client_cert_headers(c, out);
    if (cfg->via && OURS("Via"))
        puts_(out, "Via: 1.1 portico\r\n");
#undef OURS
    if (ed)
        filter_edits_emit(ed, out);
    /* The only upgrade forwarded (tunnel.h); any other was dropped above. */
    if (r->ws)
        puts_(out, "Connection: Upgrade\r\nUpgrade: websocket\r\n");
    if (r->rb == RB_CHUNKED) {
        puts_(out, "Transfer-Encoding: chunked\r\n");
    } else if (r->rb == RB_LENGTH) {
        put_content_length(out, r->rb_left);
    }
    put(out, "\r\n", 2);
}

void proxy_build_response(struct conn *c, const struct http_response *resp, int body_kind)
{
    struct request *r = &c->req;
    struct buf *out = &c->out;
    put(out, "HTTP/1.1 ", 9);
    put_uint(out, (uint64_t)resp->status); /* the parser keeps it to 3 digits */
    put(out, " ", 1);
    if (resp->reason.len)
        put(out, resp->reason.p, resp->reason.len);
    else
        puts_(out, http_status_reason(resp->status));
    put(out, "\r\n", 2);

    struct conn_tokens ct;
    connection_tokens(resp->headers, resp->nheaders, &ct);
    for (size_t i = 0; i < resp->nheaders; i++) {
        const struct http_header *f = &resp->headers[i];
        if (proxy_is_hop_by_hop(f->name.p, f->name.len) ||
            named_by_connection(&ct, &f->name, resp->headers, resp->nheaders))
            continue;
        if (r->resp_edits && filter_edits_drop(r->resp_edits, f->name.p, f->name.len))
            continue;
        put(out, f->name.p, f->name.len);
        put(out, ": ", 2);
        put(out, f->value.p, f->value.len);
        put(out, "\r\n", 2);
    }
    if (c->ps->cfg->via)
        puts_(out, "Via: 1.1 portico\r\n");
    if (r->resp_edits)
        filter_edits_emit(r->resp_edits, out);
    switch ((enum http_body_kind)body_kind) {
    case HTTP_BODY_NONE:
        /* HEAD and 304 answers keep the length the full answer would have. */
        if (resp->content_length >= 0 && resp->status != 204 && resp->status >= 200) {
            put_content_length(out, (uint64_t)resp->content_length);
        }
        break;
    case HTTP_BODY_LENGTH:
        put_content_length(out, (uint64_t)resp->content_length);
        break;
    case HTTP_BODY_CHUNKED:
    case HTTP_BODY_UNTIL_CLOSE:
        if (r->out_chunked)
            puts_(out, "Transfer-Encoding: chunked\r\n");
        break;
    }
    if (resp->status == 101)
        puts_(out, "Connection: Upgrade\r\nUpgrade: websocket\r\n"); /* tunnel_begin */
    else if (c->close_after)
        puts_(out, "Connection: close\r\n");
    else if (r->head.minor == 0)
        puts_(out, "Connection: keep-alive\r\n");
    put(out, "\r\n", 2);
}
