/* libFuzzer target for src/http1.c.
 *
 * The input is parsed as a request head, a response head and a chunked
 * body. Invariants checked (abort on violation):
 *   - a head length never exceeds the input; every span lies inside the head;
 *   - refusals use only the documented statuses and always name a reason;
 *   - feeding the same bytes split in two (at a point chosen from the
 *     input) or one byte at a time gives the one-shot result and facts;
 *   - the chunked decoder never consumes more than it was given, hands out
 *     DATA and TRAILER spans inside its buffer, always makes progress, and
 *     decodes the same bytes whatever way the input is split.
 */
#include "http1.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ASSERT(c)                                                                           \
    do {                                                                                    \
        if (!(c)) {                                                                         \
            fprintf(stderr, "fuzz_http1: assertion failed at line %d: %s\n", __LINE__, #c); \
            abort();                                                                        \
        }                                                                                   \
    } while (0)

#define CAP 40
/* Small limits so that the fuzzer reaches 414 and 431 easily. */
static const struct http_parse_limits lim = { 2048, 32, 512 };

static int inside(const char *base, size_t len, struct http_str s)
{
    if (s.p == NULL)
        return s.len == 0;
    return s.p >= base && s.len <= len && (size_t)(s.p - base) <= len - s.len;
}

static int same_request(const struct http_request *a, const struct http_request *b)
{
    if (a->method != b->method || a->method_str.p != b->method_str.p ||
        a->method_str.len != b->method_str.len || a->target.p != b->target.p ||
        a->target.len != b->target.len || a->minor != b->minor || a->nheaders != b->nheaders ||
        a->host.p != b->host.p || a->host.len != b->host.len ||
        a->content_length != b->content_length || a->chunked != b->chunked ||
        a->conn_close != b->conn_close || a->expect_continue != b->expect_continue ||
        a->has_upgrade != b->has_upgrade)
        return 0;
    for (size_t i = 0; i < a->nheaders; i++)
        if (a->headers[i].name.p != b->headers[i].name.p ||
            a->headers[i].name.len != b->headers[i].name.len ||
            a->headers[i].value.p != b->headers[i].value.p ||
            a->headers[i].value.len != b->headers[i].value.len)
            return 0;
    return 1;
}

static int same_response(const struct http_response *a, const struct http_response *b)
{
    if (a->status != b->status || a->minor != b->minor || a->reason.p != b->reason.p ||
        a->reason.len != b->reason.len || a->nheaders != b->nheaders ||
        a->content_length != b->content_length || a->chunked != b->chunked ||
        a->conn_close != b->conn_close)
        return 0;
    for (size_t i = 0; i < a->nheaders; i++)
        if (a->headers[i].name.p != b->headers[i].name.p ||
            a->headers[i].value.p != b->headers[i].value.p ||
            a->headers[i].value.len != b->headers[i].value.len)
            return 0;
    return 1;
}

static void check_refusal(int rc, int response)
{
    if (rc >= 0)
        return;
    if (response)
        ASSERT(rc == -502);
    else
        ASSERT(rc == -400 || rc == -414 || rc == -431 || rc == -501 || rc == -505);
    ASSERT(http_last_error() != NULL && http_last_error()[0] != '\0');
}

/* ---- requests ---- */

static int request_feed(const char *buf, size_t len, size_t split, int bytewise,
                        struct http_request *r, struct http_header *h)
{
    size_t scanned = 0;
    int rc = 0;
    r->headers = h;
    r->max_headers_cap = CAP;
    if (bytewise) {
        for (size_t i = 0; i <= len && rc == 0; i++)
            rc = http_parse_request(buf, i, &scanned, &lim, r);
        return rc;
    }
    rc = http_parse_request(buf, split, &scanned, &lim, r);
    if (rc == 0)
        rc = http_parse_request(buf, len, &scanned, &lim, r);
    return rc;
}

static void fuzz_request(const char *buf, size_t len, size_t split)
{
    static struct http_header h1[CAP], h2[CAP];
    struct http_request r1, r2;
    int rc = request_feed(buf, len, len, 0, &r1, h1);
    ASSERT(rc <= (int)len);
    check_refusal(rc, 0);
    if (rc > 0) {
        size_t n = (size_t)rc;
        ASSERT(r1.nheaders <= CAP && r1.nheaders <= lim.max_headers);
        ASSERT(inside(buf, n, r1.method_str) && r1.method_str.len > 0);
        ASSERT(inside(buf, n, r1.target) && r1.target.len > 0);
        ASSERT(r1.target.len <= lim.max_target_bytes);
        ASSERT(inside(buf, n, r1.host));
        ASSERT(r1.minor == 0 || r1.minor == 1);
        ASSERT(r1.method != HTTP_M_CONNECT);
        ASSERT(!(r1.chunked && r1.content_length >= 0));
        ASSERT(r1.content_length >= -1 && r1.content_length <= (int64_t)1 << 62);
        ASSERT(n <= lim.max_head_bytes);
        ASSERT(n >= 4 && memcmp(buf + n - 4, "\r\n\r\n", 4) == 0);
        for (size_t i = 0; i < r1.nheaders; i++) {
            ASSERT(inside(buf, n, h1[i].name) && h1[i].name.len > 0);
            ASSERT(inside(buf, n, h1[i].value));
        }
    }
    int rc2 = request_feed(buf, len, split, 0, &r2, h2);
    ASSERT(rc2 == rc);
    if (rc > 0)
        ASSERT(same_request(&r1, &r2));
    rc2 = request_feed(buf, len, 0, 1, &r2, h2);
    ASSERT(rc2 == rc);
    if (rc > 0)
        ASSERT(same_request(&r1, &r2));
}

/* ---- responses ---- */

static int response_feed(const char *buf, size_t len, size_t split, struct http_response *r,
                         struct http_header *h)
{
    size_t scanned = 0;
    r->headers = h;
    r->max_headers_cap = CAP;
    int rc = http_parse_response(buf, split, &scanned, &lim, r);
    if (rc == 0)
        rc = http_parse_response(buf, len, &scanned, &lim, r);
    return rc;
}

static void fuzz_response(const char *buf, size_t len, size_t split)
{
    static struct http_header h1[CAP], h2[CAP];
    struct http_response r1, r2;
    int rc = response_feed(buf, len, len, &r1, h1);
    ASSERT(rc <= (int)len);
    check_refusal(rc, 1);
    if (rc > 0) {
        size_t n = (size_t)rc;
        ASSERT(r1.status >= 100 && r1.status <= 599);
        ASSERT(inside(buf, n, r1.reason));
        ASSERT(!(r1.chunked && r1.content_length >= 0));
        for (size_t i = 0; i < r1.nheaders; i++)
            ASSERT(inside(buf, n, h1[i].name) && inside(buf, n, h1[i].value));
        enum http_body_kind k = http_response_body_kind(&r1, HTTP_M_GET);
        ASSERT(k != HTTP_BODY_CHUNKED || r1.chunked);
        ASSERT(http_response_body_kind(&r1, HTTP_M_HEAD) == HTTP_BODY_NONE);
    }
    int rc2 = response_feed(buf, len, split, &r2, h2);
    ASSERT(rc2 == rc);
    if (rc > 0)
        ASSERT(same_response(&r1, &r2));
}

/* ---- chunked bodies ---- */

struct chunk_sum {
    int result;
    uint64_t hash; /* FNV-1a over data bytes, with trailers marked */
    size_t data_bytes, trailers, consumed;
};

static void hash_bytes(uint64_t *h, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        *h = (*h ^ (uint8_t)p[i]) * 0x100000001b3ull;
}

/* Decode what buf[0..len) holds; returns after DONE, ERROR or MORE. */
static int chunk_pass(struct http_chunked *c, const char *buf, size_t len, size_t *used_total,
                      struct chunk_sum *s)
{
    size_t off = 0;
    for (;;) {
        size_t used = (size_t)-1, dl = (size_t)-1;
        const char *d = NULL;
        int rc = http_chunked_decode(c, buf + off, len - off, &used, &d, &dl);
        ASSERT(used <= len - off);
        if (rc == HTTP_CHUNK_DATA) {
            ASSERT(dl > 0 && used > 0);
            ASSERT(d >= buf + off && d + dl <= buf + off + used);
            hash_bytes(&s->hash, d, dl);
            s->data_bytes += dl;
        } else if (rc == HTTP_CHUNK_TRAILER) {
            ASSERT(used > 0);
            ASSERT(d >= buf + off && d + dl <= buf + off + used);
            hash_bytes(&s->hash, "\n", 1);
            hash_bytes(&s->hash, d, dl);
            s->trailers++;
        } else {
            ASSERT(rc == HTTP_CHUNK_MORE || rc == HTTP_CHUNK_DONE || rc == HTTP_CHUNK_ERROR);
        }
        off += used;
        *used_total += used;
        if (rc != HTTP_CHUNK_DATA && rc != HTTP_CHUNK_TRAILER)
            return rc;
    }
}

static void chunk_run(const char *in, size_t len, size_t split, char *work, struct chunk_sum *s)
{
    struct http_chunked c;
    size_t wlen = 0, fed = 0;
    http_chunked_init(&c);
    memset(s, 0, sizeof(*s));
    s->hash = 0xcbf29ce484222325ull;
    s->result = HTTP_CHUNK_MORE;
    while (fed < len) {
        size_t piece = fed < split ? split - fed : len - fed;
        memcpy(work + wlen, in + fed, piece);
        wlen += piece;
        fed += piece;
        size_t used = 0;
        s->result = chunk_pass(&c, work, wlen, &used, s);
        s->consumed += used;
        memmove(work, work + used, wlen - used);
        wlen -= used;
        if (s->result != HTTP_CHUNK_MORE)
            break;
    }
}

static void fuzz_chunked(const char *buf, size_t len, size_t split)
{
    struct chunk_sum a, b;
    char *work = malloc(len ? len : 1);
    chunk_run(buf, len, len, work, &a);
    if (a.result == HTTP_CHUNK_ERROR)
        ASSERT(http_last_error()[0] != '\0');
    if (split > 0 && split < len) {
        chunk_run(buf, len, split, work, &b);
        ASSERT(a.result == b.result && a.hash == b.hash && a.data_bytes == b.data_bytes &&
               a.trailers == b.trailers && a.consumed == b.consumed);
    }
    free(work);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    size_t split = size ? ((size_t)data[size / 2] * 257u + data[size - 1]) % (size + 1) : 0;
    fuzz_request(buf, size, split);
    fuzz_response(buf, size, split);
    fuzz_chunked(buf, size, split);
    return 0;
}
