/* Tests for src/http1.c: request and response heads, refusals with their
 * statuses and reasons, incremental parsing, and the chunked decoder fed
 * at every split point. */
#include "http1.h"
#include "testlib.h"
#include "tunnel.h"

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define NHDRS 128
static struct http_header hdrs[NHDRS];
static struct http_parse_limits lim = { 8192, 64, 2048 };

#define CHECK_REASON(why)                                                                      \
    do {                                                                                       \
        const char *e_ = http_last_error();                                                    \
        if (strstr(e_, (why)))                                                                 \
            t_passed++;                                                                        \
        else {                                                                                 \
            t_failed++;                                                                        \
            fprintf(stderr, "%s:%d: reason \"%s\", expected \"%s\"\n", __FILE__, __LINE__, e_, \
                    (why));                                                                    \
        }                                                                                      \
    } while (0)

/* ---- request drivers ---- */

static int req_once(const char *s, size_t n, struct http_request *r, struct http_header *h)
{
    size_t scanned = 0;
    r->headers = h;
    r->max_headers_cap = NHDRS;
    return http_parse_request(s, n, &scanned, &lim, r);
}

/* Feed s[0..k) then s[0..n) (k == 0: byte by byte), the way a connection
 * does as bytes arrive: same buffer, same *scanned. */
static int req_split(const char *s, size_t n, size_t k, struct http_request *r,
                     struct http_header *h)
{
    size_t scanned = 0;
    int rc = 0;
    r->headers = h;
    r->max_headers_cap = NHDRS;
    if (k == 0) {
        for (size_t i = 1; i <= n && rc == 0; i++)
            rc = http_parse_request(s, i, &scanned, &lim, r);
        return rc;
    }
    rc = http_parse_request(s, k, &scanned, &lim, r);
    if (rc == 0)
        rc = http_parse_request(s, n, &scanned, &lim, r);
    return rc;
}

static int same_request(const struct http_request *a, const struct http_request *b)
{
    return a->method == b->method && a->method_str.p == b->method_str.p &&
           a->target.p == b->target.p && a->target.len == b->target.len && a->minor == b->minor &&
           a->nheaders == b->nheaders && a->host.p == b->host.p && a->host.len == b->host.len &&
           a->content_length == b->content_length && a->chunked == b->chunked &&
           a->conn_close == b->conn_close && a->expect_continue == b->expect_continue &&
           a->has_upgrade == b->has_upgrade;
}

/* One-shot parse, checked against every split point and byte-by-byte
 * feeding: all must give the same result and the same facts. */
static int req_n(const char *s, size_t n, struct http_request *r)
{
    static struct http_header h2[NHDRS];
    struct http_request r2;
    int rc = req_once(s, n, r, hdrs);
    int agree = 1;
    for (size_t k = 0; k < n && agree; k++) {
        int rc2 = req_split(s, n, k, &r2, h2);
        if (rc2 != rc || (rc > 0 && !same_request(r, &r2))) {
            fprintf(stderr, "split at %zu: %d, one-shot %d\n", k, rc2, rc);
            agree = 0;
        }
    }
    CHECK(agree);
    /* Leave the one-shot's facts and reason for the caller to check. */
    req_once(s, n, r, hdrs);
    return rc;
}

static int req(const char *s, struct http_request *r)
{
    return req_n(s, strlen(s), r);
}

#define REQ_REFUSED(lit, status, why)                                \
    do {                                                             \
        struct http_request r_;                                      \
        CHECK_EQ_INT(req_n((lit), sizeof(lit) - 1, &r_), -(status)); \
        CHECK_REASON(why);                                           \
    } while (0)

#define REQ_OK(lit)                                                               \
    do {                                                                          \
        struct http_request r_;                                                   \
        CHECK_EQ_INT(req_n((lit), sizeof(lit) - 1, &r_), (int)(sizeof(lit) - 1)); \
    } while (0)

/* ---- good requests ---- */

static void test_simple_get(void)
{
    static const char s[] = "GET /index.html?q=1 HTTP/1.1\r\n"
                            "Host: example.com\r\n"
                            "User-Agent: test/1.0\r\n"
                            "Accept: */*\r\n\r\n";
    struct http_request r;
    CHECK_EQ_INT(req(s, &r), sizeof(s) - 1);
    CHECK_EQ_INT(r.method, HTTP_M_GET);
    CHECK_STR(r.method_str.p, r.method_str.len, "GET");
    CHECK_STR(r.target.p, r.target.len, "/index.html?q=1");
    CHECK_EQ_INT(r.minor, 1);
    CHECK_EQ_INT(r.nheaders, 3);
    CHECK_STR(r.headers[0].name.p, r.headers[0].name.len, "Host");
    CHECK_STR(r.headers[0].value.p, r.headers[0].value.len, "example.com");
    CHECK_STR(r.headers[2].name.p, r.headers[2].name.len, "Accept");
    CHECK_STR(r.headers[2].value.p, r.headers[2].value.len, "*/*");
    CHECK_STR(r.host.p, r.host.len, "example.com");
    CHECK_EQ_INT(r.content_length, -1);
    CHECK(!r.chunked && !r.conn_close && !r.expect_continue && !r.has_upgrade);
    CHECK(r.target.p == s + 4);
}

static void test_post_with_body(void)
{
    static const char s[] = "POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
    struct http_request r;
    int n = req(s, &r);
    CHECK_EQ_INT(n, sizeof(s) - 1 - 5);
    CHECK_EQ_INT(r.method, HTTP_M_POST);
    CHECK_EQ_INT(r.content_length, 5);
    CHECK(n > 0 && memcmp(s + n, "hello", 5) == 0);

    static const char same[] = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n";
    CHECK_EQ_INT(req(same, &r), sizeof(same) - 1);
    CHECK_EQ_INT(r.content_length, 5);
    static const char twice[] = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n"
                                "content-length:7\r\n\r\n";
    CHECK_EQ_INT(req(twice, &r), sizeof(twice) - 1);
    CHECK_EQ_INT(r.content_length, 7);
    static const char zero[] = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n";
    CHECK_EQ_INT(req(zero, &r), sizeof(zero) - 1);
    CHECK_EQ_INT(r.content_length, 0);
    static const char max[] = "POST / HTTP/1.1\r\nHost: a\r\n"
                              "Content-Length: 4611686018427387904\r\n\r\n";
    CHECK_EQ_INT(req(max, &r), sizeof(max) - 1);
    CHECK_EQ_INT(r.content_length, (int64_t)1 << 62);
}

static void test_chunked_request(void)
{
    static const char s[] = "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  Chunked \r\n\r\n";
    struct http_request r;
    CHECK_EQ_INT(req(s, &r), sizeof(s) - 1);
    CHECK(r.chunked);
    CHECK_EQ_INT(r.content_length, -1);
}

static void test_connection_facts(void)
{
    struct http_request r;
    static const char ka10[] = "GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
    CHECK_EQ_INT(req(ka10, &r), sizeof(ka10) - 1);
    CHECK_EQ_INT(r.minor, 0);
    CHECK(!r.conn_close);
    CHECK(r.host.p == NULL);
    static const char plain10[] = "GET / HTTP/1.0\r\n\r\n";
    CHECK_EQ_INT(req(plain10, &r), sizeof(plain10) - 1);
    CHECK(r.conn_close);
    static const char close11[] = "GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, Close\r\n\r\n";
    CHECK_EQ_INT(req(close11, &r), sizeof(close11) - 1);
    CHECK(r.conn_close);
    static const char both10[] = "GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n";
    CHECK_EQ_INT(req(both10, &r), sizeof(both10) - 1);
    CHECK(r.conn_close);

    static const char exp[] = "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\n"
                              "Content-Length: 3\r\n\r\n";
    CHECK_EQ_INT(req(exp, &r), sizeof(exp) - 1);
    CHECK(r.expect_continue);
    static const char exp10[] = "PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n";
    CHECK_EQ_INT(req(exp10, &r), sizeof(exp10) - 1);
    CHECK(!r.expect_continue);
    static const char expother[] = "PUT / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n";
    CHECK_EQ_INT(req(expother, &r), sizeof(expother) - 1);
    CHECK(!r.expect_continue);

    static const char up[] = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                             "Upgrade: websocket\r\n\r\n";
    CHECK_EQ_INT(req(up, &r), sizeof(up) - 1);
    CHECK(r.has_upgrade);
    CHECK(!r.conn_close);
}

static void test_values_and_methods(void)
{
    struct http_request r;
    static const char obs[] = "GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xc3\xa9 \xff\r\n"
                              "X-Ows: \t a\tb \t\r\nX-Empty:\r\nX-Sp: \r\n\r\n";
    CHECK_EQ_INT(req(obs, &r), sizeof(obs) - 1);
    CHECK_EQ_INT(r.nheaders, 5);
    CHECK_STR(r.headers[1].value.p, r.headers[1].value.len, "caf\xc3\xa9 \xff");
    CHECK_STR(r.headers[2].value.p, r.headers[2].value.len, "a\tb");
    CHECK_EQ_INT(r.headers[3].value.len, 0);
    CHECK_EQ_INT(r.headers[4].value.len, 0);

    static const char longval[] =
        "GET / HTTP/1.1\r\nHost: a\r\n"
        "Cookie: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa=bbbbbbbbbbbbbbbbbbbbbbbbbbbb\t"
        "cccccccccccccccccccccccccccccccccccc; d=\x80\x81\x82\x83\x84\x85\x86\x87"
        "\x88\x89\r\n\r\n";
    CHECK_EQ_INT(req(longval, &r), sizeof(longval) - 1);
    CHECK_EQ_INT(r.headers[1].value.len, sizeof(longval) - 1 - 25 - 8 - 4);

    static const struct {
        const char *s;
        enum http_method m;
    } methods[] = {
        { "GET", HTTP_M_GET },     { "HEAD", HTTP_M_HEAD },      { "POST", HTTP_M_POST },
        { "PUT", HTTP_M_PUT },     { "DELETE", HTTP_M_DELETE },  { "OPTIONS", HTTP_M_OPTIONS },
        { "PATCH", HTTP_M_PATCH }, { "TRACE", HTTP_M_TRACE },    { "PURGE", HTTP_M_OTHER },
        { "get", HTTP_M_OTHER },   { "M-SEARCH", HTTP_M_OTHER },
    };
    for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++) {
        char buf[128];
        int n = snprintf(buf, sizeof(buf), "%s / HTTP/1.1\r\nHost: h\r\n\r\n", methods[i].s);
        CHECK_EQ_INT(req_n(buf, (size_t)n, &r), n);
        CHECK_EQ_INT(r.method, methods[i].m);
        CHECK_STR(r.method_str.p, r.method_str.len, methods[i].s);
    }
}

static void test_targets(void)
{
    struct http_request r;
    static const char star[] = "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n";
    CHECK_EQ_INT(req(star, &r), sizeof(star) - 1);
    CHECK_EQ_INT(r.method, HTTP_M_OPTIONS);
    CHECK_STR(r.target.p, r.target.len, "*");
    static const char abs[] =
        "GET http://example.com:8080/x?y HTTP/1.1\r\nHost: example.com:8080\r\n\r\n";
    CHECK_EQ_INT(req(abs, &r), sizeof(abs) - 1);
    CHECK_STR(r.target.p, r.target.len, "http://example.com:8080/x?y");
    REQ_OK("GET HTTPS://EXAMPLE.COM HTTP/1.1\r\nHost: EXAMPLE.COM\r\n\r\n");
    REQ_OK("GET https://example.com/ HTTP/1.1\r\nHost:\r\n\r\n"); /* authority rules */
    REQ_OK("GET /a%20b/c;d=e/[x]{y}|~ HTTP/1.1\r\nHost: a\r\n\r\n");
    REQ_OK("OPTIONS /* HTTP/1.1\r\nHost: a\r\n\r\n");
}

static void test_hosts(void)
{
    static const char *const good[] = {
        "example.com",           "example.com:8080", "[::1]",        "[::1]:443", "10.0.0.1",
        "xn--bcher-kva.example", "a_b-c.d~e",        "caf%C3%A9.fr", "h:",        "h:65535",
    };
    static const char *const bad[] = {
        "exa mple", "exa/mple", "user@host", "a,b", "host:99999", "host:123456", "host:abc",
        "[::1",     "[]",       ":80",       "h%2", "h%zz",       "[::1]x",      "h:1:2",
    };
    struct http_request r;
    char buf[256];
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        int n = snprintf(buf, sizeof(buf), "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", good[i]);
        CHECK_EQ_INT(req_n(buf, (size_t)n, &r), n);
        CHECK_STR(r.host.p, r.host.len, good[i]);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int n = snprintf(buf, sizeof(buf), "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", bad[i]);
        CHECK_EQ_INT(req_n(buf, (size_t)n, &r), -400);
        CHECK_REASON("invalid Host");
    }
}

static void test_leading_crlf_and_pipelining(void)
{
    struct http_request r;
    static const char lead[] = "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
    CHECK_EQ_INT(req(lead, &r), sizeof(lead) - 1);
    CHECK(r.method_str.p == lead + 4);
    REQ_OK("\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    REQ_REFUSED("\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "empty lines");

    static const char pipe[] = "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                               "POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                               "GET /3 HTTP/1.1\r\nHost: a\r\n\r\n";
    size_t off = 0, total = sizeof(pipe) - 1;
    int n = req_n(pipe, total, &r);
    CHECK_EQ_INT(n, 28);
    CHECK_STR(r.target.p, r.target.len, "/1");
    off += (size_t)n;
    n = req_n(pipe + off, total - off, &r);
    CHECK_EQ_INT(n, 48);
    CHECK_STR(r.target.p, r.target.len, "/2");
    CHECK_EQ_INT(r.content_length, 3);
    off += (size_t)n + 3;
    n = req_n(pipe + off, total - off, &r);
    CHECK_STR(r.target.p, r.target.len, "/3");
    CHECK_EQ_INT(off + (size_t)n, total);
}

static void test_header_count(void)
{
    char buf[8192];
    struct http_request r;
    size_t n = (size_t)sprintf(buf, "GET / HTTP/1.1\r\nHost: a\r\n");
    for (int i = 1; i < 64; i++)
        n += (size_t)sprintf(buf + n, "X-%d: %d\r\n", i, i);
    size_t body = n;
    n += (size_t)sprintf(buf + n, "\r\n");
    CHECK_EQ_INT(req_once(buf, n, &r, hdrs), (int)n); /* exactly 64 */
    CHECK_EQ_INT(r.nheaders, 64);
    n = body + (size_t)sprintf(buf + body, "X-65: 65\r\n\r\n");
    CHECK_EQ_INT(req_once(buf, n, &r, hdrs), -431);
    CHECK_REASON("too many header fields");
    /* The caller's array is smaller than max_headers. */
    size_t scanned = 0;
    r.headers = hdrs;
    r.max_headers_cap = 2;
    static const char three[] = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n";
    CHECK_EQ_INT(http_parse_request(three, sizeof(three) - 1, &scanned, &lim, &r), -431);
}

/* ---- refused requests ---- */

static void test_request_refusals(void)
{
    /* framing */
    REQ_REFUSED(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400, "content-length with transfer-encoding");
    REQ_REFUSED(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        400, "content-length with transfer-encoding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400,
                "differing Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", 400,
                "differing Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n", 400,
                "invalid Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400,
                "invalid Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5a\r\n\r\n", 400,
                "invalid Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n", 400,
                "invalid Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5,,5\r\n\r\n", 400,
                "invalid Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400,
                "invalid Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4611686018427387905\r\n\r\n", 400,
                "invalid Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                400, "invalid Content-Length");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
                "unsupported transfer coding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
                "unsupported transfer coding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 501,
                "unsupported transfer coding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                "Transfer-Encoding: chunked\r\n\r\n",
                501, "unsupported transfer coding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 501,
                "unsupported transfer coding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501,
                "unsupported transfer coding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked;q=1\r\n\r\n", 501,
                "unsupported transfer coding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n", 400,
                "invalid Transfer-Encoding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n", 400,
                "invalid Transfer-Encoding");
    REQ_REFUSED("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n", 400,
                "invalid Transfer-Encoding");
    REQ_REFUSED("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
                "transfer-encoding in HTTP/1.0");

    /* field syntax */
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400, "obs-fold");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n", 400, "obs-fold");
    REQ_REFUSED("GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400, "whitespace after start-line");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "whitespace before colon");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400, "whitespace before colon");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n", 400, "NUL in field value");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n", 400,
                "control character in field value");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x7f\r\n\r\n", 400,
                "control character in field value");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX-A: \x1b[31m\r\n\r\n", 400,
                "control character in field value");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX\x01Y: b\r\n\r\n", 400,
                "invalid character in field name");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX\xc3\xa9: b\r\n\r\n", 400,
                "invalid character in field name");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX(Y): b\r\n\r\n", 400,
                "invalid character in field name");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n", 400, "empty field name");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400, "missing colon");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400, "bare CR");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\n\rX: y\r\n\r\n", 400, "bare CR");
    REQ_REFUSED("GET / HTTP/1.1\nHost: a\r\n\r\n", 400, "bare LF");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\n\r\n", 400, "bare LF");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\n\n", 400, "bare LF");
    REQ_REFUSED("\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bare LF");
    REQ_REFUSED("\rGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bare CR");

    /* Host */
    REQ_REFUSED("GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n", 400, "missing Host");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400, "repeated Host");
    REQ_REFUSED("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400, "repeated Host");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost:\r\n\r\n", 400, "empty Host");
    REQ_REFUSED("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "invalid Host");

    /* request-line */
    REQ_REFUSED("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "unsupported HTTP version");
    REQ_REFUSED("GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505, "unsupported HTTP version");
    REQ_REFUSED("GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505, "unsupported HTTP version");
    REQ_REFUSED("GET /\r\n\r\n", 400, "HTTP/0.9");
    REQ_REFUSED("GET / http/1.1\r\nHost: a\r\n\r\n", 400, "invalid HTTP version");
    REQ_REFUSED("GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400, "invalid HTTP version");
    REQ_REFUSED("GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400, "invalid HTTP version");
    REQ_REFUSED("GET / HTTP/1\r\nHost: a\r\n\r\n", 400, "invalid HTTP version");
    REQ_REFUSED("GET / HTTP/1.1\rX\r\nHost: a\r\n\r\n", 400, "invalid HTTP version");
    REQ_REFUSED("GET / HTTP/1.1X\r\nHost: a\r\n\r\n", 400, "invalid HTTP version");
    REQ_REFUSED("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "empty request-target");
    REQ_REFUSED("GET /  HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid HTTP version");
    REQ_REFUSED("GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid method");
    REQ_REFUSED(" GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid method");
    REQ_REFUSED("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid method");
    REQ_REFUSED("GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400,
                "invalid character in request-target");
    REQ_REFUSED("GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400,
                "invalid character in request-target");
    REQ_REFUSED("GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n", 400,
                "invalid character in request-target");
    REQ_REFUSED("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501,
                "CONNECT");
    REQ_REFUSED("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "asterisk-form outside OPTIONS");
    REQ_REFUSED("GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target form");
    REQ_REFUSED("GET example.com:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400,
                "invalid request-target form");
    REQ_REFUSED("GET ftp://example.com/ HTTP/1.1\r\nHost: a\r\n\r\n", 400,
                "invalid request-target form");
    REQ_REFUSED("GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target form");
    REQ_REFUSED("GET http:// HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target form");
    REQ_REFUSED("OPTIONS ** HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target form");
}

/* Refusals found before the head is complete: no terminator ever comes. */
static void test_early_refusals(void)
{
    struct http_request r;
    static char buf[20000];
    size_t scanned = 0;

    static const char lf[] = "GET / HTTP/1.1\r\nHost: a\nX-Never: ending";
    CHECK_EQ_INT(req_once(lf, sizeof(lf) - 1, &r, hdrs), -400);
    CHECK_REASON("bare LF");

    /* A target over max_target_bytes: 414 with and without the line end. */
    memset(buf, 'a', sizeof(buf));
    memcpy(buf, "GET /", 5);
    CHECK_EQ_INT(req_once(buf, lim.max_target_bytes + 100, &r, hdrs), -414);
    CHECK_REASON("request-target too long");
    CHECK_EQ_INT(req_once(buf, lim.max_target_bytes + 5, &r, hdrs), 0);
    size_t n = 4 + lim.max_target_bytes + 1;
    n += (size_t)sprintf(buf + n, " HTTP/1.1\r\nHost: a\r\n\r\n");
    CHECK_EQ_INT(req_once(buf, n, &r, hdrs), -414);
    CHECK_REASON("request-target too long");
    /* Exactly max_target_bytes is fine. */
    n = 4 + lim.max_target_bytes;
    n += (size_t)sprintf(buf + n, " HTTP/1.1\r\nHost: a\r\n\r\n");
    CHECK_EQ_INT(req_once(buf, n, &r, hdrs), (int)n);
    CHECK_EQ_INT(r.target.len, lim.max_target_bytes);
    /* Fed in pieces, the overlong target is noticed once enough arrived. */
    memset(buf, 'a', sizeof(buf));
    memcpy(buf, "GET /", 5);
    int rc = 0;
    scanned = 0;
    r.headers = hdrs;
    r.max_headers_cap = NHDRS;
    size_t fed;
    for (fed = 100; fed <= sizeof(buf) && rc == 0; fed += 100)
        rc = http_parse_request(buf, fed, &scanned, &lim, &r);
    CHECK_EQ_INT(rc, -414);
    CHECK(fed <= lim.max_target_bytes + 300);
    /* A short target with an overlong garbage version is a 400. */
    memcpy(buf, "GET / HTTP/1.1", 14);
    CHECK_EQ_INT(req_once(buf, lim.max_target_bytes + 100, &r, hdrs), -400);
    CHECK_REASON("request-line too long");

    /* A head over max_head_bytes: 431, complete or not. */
    n = (size_t)sprintf(buf, "GET / HTTP/1.1\r\nHost: a\r\nX-Big: ");
    memset(buf + n, 'b', sizeof(buf) - n);
    CHECK_EQ_INT(req_once(buf, lim.max_head_bytes, &r, hdrs), 0);
    CHECK_EQ_INT(req_once(buf, lim.max_head_bytes + 1, &r, hdrs), -431);
    CHECK_REASON("head too large");
    memcpy(buf + lim.max_head_bytes - 4, "\r\n\r\n", 4);
    CHECK_EQ_INT(req_once(buf, lim.max_head_bytes, &r, hdrs), (int)lim.max_head_bytes);
    memcpy(buf + lim.max_head_bytes - 4, "bbbb\r\n\r\n", 8);
    CHECK_EQ_INT(req_once(buf, lim.max_head_bytes + 4, &r, hdrs), -431);
    /* Incomplete heads wait. */
    CHECK_EQ_INT(req_once("GET / HTTP/1.1\r\nHost: a\r\n", 25, &r, hdrs), 0);
    CHECK_EQ_INT(req_once("", 0, &r, hdrs), 0);
    CHECK_EQ_INT(req_once("\r", 1, &r, hdrs), 0);
    CHECK_EQ_INT(req_once("\r\n\r", 3, &r, hdrs), 0);
}

/* Distinct failures must name distinct reasons. */
static void test_distinct_reasons(void)
{
#define C(lit)                 \
    {                          \
        (lit), sizeof(lit) - 1 \
    }
    static const struct {
        const char *s;
        size_t n;
    } cases[] = {
        C("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
        C("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
        C("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n"),
        C("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
        C("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,\r\n\r\n"),
        C("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"),
        C("GET / HTTP/1.1\r\n X: a\r\nHost: a\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
        C("GET / HTTP/1.1\nHost: a\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost: a\r\nX: \0\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost: a\r\nX: \x02\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost: a\r\nX\x02: b\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost: a\r\nX\r\n\r\n"),
        C("GET / HTTP/1.1\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost: @\r\n\r\n"),
        C("GET / HTTP/1.1\r\nHost:\r\n\r\n"),
        C("GET / HTTP/3.0\r\nHost: a\r\n\r\n"),
        C("GET /\r\n\r\n"),
        C("GET / HTTP/1.1x\r\nHost: a\r\n\r\n"),
        C("GET  / HTTP/1.1\r\nHost: a\r\n\r\n"),
        C("GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n"),
        C("G@T / HTTP/1.1\r\nHost: a\r\n\r\n"),
        C("CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n"),
        C("GET * HTTP/1.1\r\nHost: a\r\n\r\n"),
        C("GET a HTTP/1.1\r\nHost: a\r\n\r\n"),
        C("\r\n\r\n\r\n\r\n\r\n"),
    };
#undef C
    enum { N = sizeof(cases) / sizeof(cases[0]) };
    const char *why[N];
    struct http_request r;
    for (size_t i = 0; i < N; i++) {
        CHECK(req_once(cases[i].s, cases[i].n, &r, hdrs) < 0);
        why[i] = http_last_error();
        CHECK(why[i] && why[i][0]);
    }
    int distinct = 1;
    for (size_t i = 0; i < N; i++)
        for (size_t j = i + 1; j < N; j++)
            if (strcmp(why[i], why[j]) == 0) {
                fprintf(stderr, "cases %zu and %zu share the reason \"%s\"\n", i, j, why[i]);
                distinct = 0;
            }
    CHECK(distinct);
}

/* ---- incremental cost ---- */

static void test_incremental_linear(void)
{
    /* A 16 KB head fed one byte at a time equals the one-shot parse. */
    static struct http_header h1[300], h2[300];
    struct http_parse_limits big = { 1 << 21, 10000, 8192 };
    size_t cap = 1 << 20;
    char *buf = malloc(cap);
    size_t n = (size_t)sprintf(buf, "GET /incremental HTTP/1.1\r\nHost: a\r\n");
    while (n < 16 * 1024)
        n += (size_t)sprintf(buf + n, "X-Header-%zu: %060zu\r\n", n, n);
    n += (size_t)sprintf(buf + n, "\r\n");
    struct http_request one, inc;
    size_t scanned = 0;
    one.headers = h1;
    one.max_headers_cap = 300;
    int rc1 = http_parse_request(buf, n, &scanned, &big, &one);
    CHECK_EQ_INT(rc1, (int)n);
    scanned = 0;
    inc.headers = h2;
    inc.max_headers_cap = 300;
    int rc2 = 0;
    size_t i;
    for (i = 1; i <= n && rc2 == 0; i++)
        rc2 = http_parse_request(buf, i, &scanned, &big, &inc);
    CHECK_EQ_INT(rc2, rc1);
    CHECK_EQ_INT(i - 1, n);
    CHECK(same_request(&one, &inc));
    int same_hdrs = one.nheaders == inc.nheaders;
    for (size_t k = 0; same_hdrs && k < one.nheaders; k++)
        same_hdrs = h1[k].name.p == h2[k].name.p && h1[k].value.len == h2[k].value.len;
    CHECK(same_hdrs);

    /* 1 MB fed byte by byte: linear work finishes in milliseconds, while
     * rescanning from the start each time would take minutes. */
    n = (size_t)sprintf(buf, "GET / HTTP/1.1\r\nHost: a\r\n");
    while (n < cap - 200)
        n += (size_t)sprintf(buf + n, "X-%zu: %0100zu\r\n", n, n);
    n += (size_t)sprintf(buf + n, "\r\n");
    static struct http_header many[10000];
    inc.headers = many;
    inc.max_headers_cap = 10000;
    scanned = 0;
    rc2 = 0;
    clock_t t0 = clock();
    for (i = 1; i <= n && rc2 == 0; i++)
        rc2 = http_parse_request(buf, i, &scanned, &big, &inc);
    double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
    CHECK_EQ_INT(rc2, (int)n);
    CHECK(secs < 3.0);
    if (secs >= 3.0)
        fprintf(stderr, "1 MB head fed byte by byte took %.2f s\n", secs);
    free(buf);
}

/* ---- responses ---- */

static int resp_n(const char *s, size_t n, struct http_response *r)
{
    size_t scanned = 0;
    r->headers = hdrs;
    r->max_headers_cap = NHDRS;
    int rc = http_parse_response(s, n, &scanned, &lim, r);
    /* Byte by byte must agree. */
    static struct http_header h2[NHDRS];
    struct http_response r2 = { .headers = h2, .max_headers_cap = NHDRS };
    int rc2 = 0;
    scanned = 0;
    for (size_t i = 1; i <= n && rc2 == 0; i++)
        rc2 = http_parse_response(s, i, &scanned, &lim, &r2);
    CHECK_EQ_INT(rc2, rc);
    if (rc > 0)
        CHECK(r2.status == r->status && r2.content_length == r->content_length &&
              r2.chunked == r->chunked && r2.conn_close == r->conn_close &&
              r2.nheaders == r->nheaders);
    scanned = 0;
    return http_parse_response(s, n, &scanned, &lim, r);
}

#define RESP(lit, r) resp_n((lit), sizeof(lit) - 1, (r))
#define RESP_REFUSED(lit, why)              \
    do {                                    \
        struct http_response r_;            \
        CHECK_EQ_INT(RESP(lit, &r_), -502); \
        CHECK_REASON(why);                  \
    } while (0)

static void test_responses(void)
{
    struct http_response r;
    static const char ok[] =
        "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nServer: x\r\n\r\nhello world\n";
    CHECK_EQ_INT(RESP(ok, &r), sizeof(ok) - 1 - 12);
    CHECK_EQ_INT(r.status, 200);
    CHECK_EQ_INT(r.minor, 1);
    CHECK_STR(r.reason.p, r.reason.len, "OK");
    CHECK_EQ_INT(r.content_length, 12);
    CHECK_EQ_INT(r.nheaders, 2);
    CHECK(!r.conn_close);
    CHECK_EQ_INT(http_response_body_kind(&r, HTTP_M_GET), HTTP_BODY_LENGTH);
    CHECK_EQ_INT(http_response_body_kind(&r, HTTP_M_HEAD), HTTP_BODY_NONE);

    static const char ch[] = "HTTP/1.1 201 Created Here\r\nTransfer-Encoding: chunked\r\n\r\n";
    CHECK_EQ_INT(RESP(ch, &r), sizeof(ch) - 1);
    CHECK_STR(r.reason.p, r.reason.len, "Created Here");
    CHECK(r.chunked);
    CHECK_EQ_INT(http_response_body_kind(&r, HTTP_M_POST), HTTP_BODY_CHUNKED);
    CHECK_EQ_INT(http_response_body_kind(&r, HTTP_M_HEAD), HTTP_BODY_NONE);

    static const char nc[] = "HTTP/1.1 204 No Content\r\n\r\n";
    CHECK_EQ_INT(RESP(nc, &r), sizeof(nc) - 1);
    CHECK_EQ_INT(http_response_body_kind(&r, HTTP_M_GET), HTTP_BODY_NONE);
    static const char nm[] = "HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n";
    CHECK_EQ_INT(RESP(nm, &r), sizeof(nm) - 1);
    CHECK_EQ_INT(http_response_body_kind(&r, HTTP_M_GET), HTTP_BODY_NONE);
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    CHECK_EQ_INT(RESP(cont, &r), sizeof(cont) - 1);
    CHECK_EQ_INT(http_response_body_kind(&r, HTTP_M_PUT), HTTP_BODY_NONE);

    static const char old[] = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close";
    CHECK_EQ_INT(RESP(old, &r), sizeof(old) - 1 - 16);
    CHECK_EQ_INT(r.minor, 0);
    CHECK(r.conn_close);
    CHECK_EQ_INT(http_response_body_kind(&r, HTTP_M_GET), HTTP_BODY_UNTIL_CLOSE);
    static const char oldka[] =
        "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
    CHECK_EQ_INT(RESP(oldka, &r), sizeof(oldka) - 1);
    CHECK(!r.conn_close);
    static const char close[] = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
    CHECK_EQ_INT(RESP(close, &r), sizeof(close) - 1);
    CHECK(r.conn_close);
    CHECK_EQ_INT(http_response_body_kind(&r, HTTP_M_GET), HTTP_BODY_UNTIL_CLOSE);

    static const char empty_reason[] = "HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n";
    CHECK_EQ_INT(RESP(empty_reason, &r), sizeof(empty_reason) - 1);
    CHECK_EQ_INT(r.reason.len, 0);
    static const char no_sp[] = "HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n";
    CHECK_EQ_INT(RESP(no_sp, &r), sizeof(no_sp) - 1);
    CHECK_EQ_INT(r.status, 404);
    static const char obs[] = "HTTP/1.1 200 \xc3\x93K\r\nX: \xff\r\n\r\n";
    CHECK_EQ_INT(RESP(obs, &r), sizeof(obs) - 1);
    static const char same_cl[] =
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
    CHECK_EQ_INT(RESP(same_cl, &r), sizeof(same_cl) - 1);
    CHECK_EQ_INT(r.content_length, 3);

    RESP_REFUSED("HTTP/1.1 20 OK\r\n\r\n", "invalid status code");
    RESP_REFUSED("HTTP/1.1 2000 OK\r\n\r\n", "invalid status code");
    RESP_REFUSED("HTTP/1.1 099 Low\r\n\r\n", "invalid status code");
    RESP_REFUSED("HTTP/1.1 600 High\r\n\r\n", "invalid status code");
    RESP_REFUSED("HTTP/1.1 2x0 OK\r\n\r\n", "invalid status code");
    RESP_REFUSED("HTTP/2 200 OK\r\n\r\n", "invalid status line");
    RESP_REFUSED("HTTP/1.2 200 OK\r\n\r\n", "invalid status line");
    RESP_REFUSED("http/1.1 200 OK\r\n\r\n", "invalid status line");
    RESP_REFUSED("HTTP/1.1  200 OK\r\n\r\n", "invalid status code");
    RESP_REFUSED("\r\nHTTP/1.1 200 OK\r\n\r\n", "invalid status line");
    RESP_REFUSED("HTTP/1.1 200 O\x01K\r\n\r\n", "invalid reason phrase");
    RESP_REFUSED("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                 "content-length with transfer-encoding");
    RESP_REFUSED("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                 "differing Content-Length");
    RESP_REFUSED("HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n", "differing Content-Length");
    RESP_REFUSED("HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", "invalid Content-Length");
    RESP_REFUSED("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                 "unsupported transfer coding");
    RESP_REFUSED("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                 "unsupported transfer coding");
    RESP_REFUSED("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                 "transfer-encoding in HTTP/1.0");
    RESP_REFUSED("HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", "obs-fold");
    RESP_REFUSED("HTTP/1.1 200 OK\r\nX : a\r\n\r\n", "whitespace before colon");
    RESP_REFUSED("HTTP/1.1 200 OK\nX: a\r\n\r\n", "bare LF");
    RESP_REFUSED("HTTP/1.1 200 OK\r\nX: a\0\r\n\r\n", "NUL in field value");

    char buf[10000];
    size_t n = (size_t)sprintf(buf, "HTTP/1.1 200 OK\r\n");
    for (int i = 0; i < 65; i++)
        n += (size_t)sprintf(buf + n, "X-%d: %d\r\n", i, i);
    n += (size_t)sprintf(buf + n, "\r\n");
    CHECK_EQ_INT(resp_n(buf, n, &r), -502);
    CHECK_REASON("too many header fields");
    n = (size_t)sprintf(buf, "HTTP/1.1 200 OK\r\nX: ");
    memset(buf + n, 'x', sizeof(buf) - n);
    CHECK_EQ_INT(resp_n(buf, sizeof(buf), &r), -502);
    CHECK_REASON("head too large");
    CHECK_EQ_INT(resp_n(buf, 100, &r), 0);
}

/* ---- chunked decoder ---- */

struct chunk_out {
    char data[8192];
    size_t dlen;
    char trailers[1024];
    size_t tlen;
    int ntrailers;
    int result;      /* last event: DONE, ERROR or MORE (input ran out) */
    size_t leftover; /* bytes after DONE */
    int bad_span;    /* a span or *consumed out of bounds */
};

/* Decode in[0..n) the way a connection would: bytes arrive in pieces
 * (first split bytes, then the rest; or step bytes at a time when step is
 * set), unconsumed bytes stay at the front of a work buffer. */
static void chunk_run(const char *in, size_t n, size_t split, size_t step, size_t max_trailer,
                      struct chunk_out *o)
{
    static char work[16384];
    size_t wlen = 0, fed = 0;
    struct http_chunked c;
    http_chunked_init(&c);
    c.max_trailer_bytes = max_trailer;
    memset(o, 0, sizeof(*o));
    o->result = HTTP_CHUNK_MORE;
    while (fed < n) {
        size_t piece = step ? step : (fed < split ? split - fed : n - fed);
        if (piece > n - fed)
            piece = n - fed;
        memcpy(work + wlen, in + fed, piece);
        wlen += piece;
        fed += piece;
        for (;;) {
            size_t used;
            const char *d;
            size_t dl;
            int rc = http_chunked_decode(&c, work, wlen, &used, &d, &dl);
            if (used > wlen)
                o->bad_span = 1;
            if (rc == HTTP_CHUNK_DATA) {
                if (d < work || d + dl > work + wlen || dl == 0 || o->dlen + dl > sizeof(o->data))
                    o->bad_span = 1;
                else
                    memcpy(o->data + o->dlen, d, dl), o->dlen += dl;
            } else if (rc == HTTP_CHUNK_TRAILER) {
                if (d < work || d + dl > work + wlen || o->tlen + dl + 1 > sizeof(o->trailers))
                    o->bad_span = 1;
                else {
                    memcpy(o->trailers + o->tlen, d, dl);
                    o->tlen += dl;
                    o->trailers[o->tlen++] = '|';
                    o->ntrailers++;
                }
            }
            memmove(work, work + used, wlen - used);
            wlen -= used;
            o->result = rc;
            if (rc == HTTP_CHUNK_DONE || rc == HTTP_CHUNK_ERROR) {
                o->leftover = wlen + (n - fed);
                return;
            }
            if (rc == HTTP_CHUNK_MORE)
                break;
        }
    }
}

static int chunk_same(const struct chunk_out *a, const struct chunk_out *b)
{
    return a->result == b->result && a->dlen == b->dlen && !memcmp(a->data, b->data, a->dlen) &&
           a->tlen == b->tlen && !memcmp(a->trailers, b->trailers, a->tlen) &&
           a->ntrailers == b->ntrailers && a->leftover == b->leftover && !a->bad_span &&
           !b->bad_span;
}

/* Decode one-shot, at every split point and byte by byte; all must agree.
 * Returns the one-shot outcome in *o. */
static void chunk_all(const char *in, size_t n, size_t max_trailer, struct chunk_out *o)
{
    static struct chunk_out o2;
    chunk_run(in, n, n, 0, max_trailer, o);
    CHECK(!o->bad_span);
    int agree = 1;
    for (size_t k = 1; k < n && agree; k++) {
        chunk_run(in, n, k, 0, max_trailer, &o2);
        if (!chunk_same(o, &o2)) {
            fprintf(stderr, "chunked split at %zu disagrees (%d vs %d)\n", k, o2.result, o->result);
            agree = 0;
        }
    }
    chunk_run(in, n, 0, 1, max_trailer, &o2);
    agree = agree && chunk_same(o, &o2);
    CHECK(agree);
}

#define CHUNK_BAD(lit, why)                                            \
    do {                                                               \
        static struct chunk_out o_;                                    \
        chunk_all((lit), sizeof(lit) - 1, 0, &o_);                     \
        CHECK_EQ_INT(o_.result, HTTP_CHUNK_ERROR);                     \
        chunk_run((lit), sizeof(lit) - 1, sizeof(lit) - 1, 0, 0, &o_); \
        CHECK_REASON(why);                                             \
    } while (0)

static void test_chunked_good(void)
{
    static struct chunk_out o;
    static const char simple[] = "5\r\nhello\r\n0\r\n\r\n";
    chunk_all(simple, sizeof(simple) - 1, 0, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_DONE);
    CHECK_STR(o.data, o.dlen, "hello");
    CHECK_EQ_INT(o.ntrailers, 0);
    CHECK_EQ_INT(o.leftover, 0);

    static const char full[] = "4;name=value;q=\"quoted \\\" str\"\r\nWiki\r\n"
                               "5 ; a = b ;c\t=\t\"x\"\r\npedia\r\n"
                               "E\r\n in\r\n\r\nchunks.\r\n"
                               "00a;ext\r\n0123456789\r\n"
                               "0;last\r\nExpires: never\r\nX-Checksum:  abc \r\n\r\n"
                               "GET / HTTP/1.1\r\n";
    chunk_all(full, sizeof(full) - 1, 0, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_DONE);
    CHECK_STR(o.data, o.dlen, "Wikipedia in\r\n\r\nchunks.0123456789");
    CHECK_EQ_INT(o.ntrailers, 2);
    CHECK_STR(o.trailers, o.tlen, "Expires: never|X-Checksum:  abc |");
    CHECK_EQ_INT(o.leftover, 16);

    /* Upper-case hex, leading zeros, and the largest size allowed. */
    static const char hex[] = "0000A\r\n0123456789\r\n0\r\n\r\n";
    chunk_all(hex, sizeof(hex) - 1, 0, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_DONE);
    CHECK_EQ_INT(o.dlen, 10);
    struct http_chunked c;
    size_t used, dl;
    const char *d;
    http_chunked_init(&c);
    CHECK_EQ_INT(http_chunked_decode(&c, "4000000000000000\r\nab", 20, &used, &d, &dl),
                 HTTP_CHUNK_DATA);
    CHECK_EQ_INT(used, 20);
    CHECK_EQ_INT(dl, 2);
    CHECK_EQ_INT(c.remaining, ((uint64_t)1 << 62) - 2);

    /* Partial data is handed out as it comes, zero copy. */
    static const char part[] = "5\r\nhel";
    http_chunked_init(&c);
    CHECK_EQ_INT(http_chunked_decode(&c, part, 6, &used, &d, &dl), HTTP_CHUNK_DATA);
    CHECK(d == part + 3);
    CHECK_EQ_INT(dl, 3);
    CHECK_EQ_INT(used, 6);
    CHECK_EQ_INT(http_chunked_decode(&c, "", 0, &used, &d, &dl), HTTP_CHUNK_MORE);
    CHECK_EQ_INT(used, 0);
    CHECK_EQ_INT(http_chunked_decode(&c, "lo\r\n0\r\n\r\n", 9, &used, &d, &dl), HTTP_CHUNK_DATA);
    CHECK_EQ_INT(used, 2);
    CHECK_EQ_INT(http_chunked_decode(&c, "\r\n0\r\n\r\n", 7, &used, &d, &dl), HTTP_CHUNK_DONE);
    CHECK_EQ_INT(used, 7);
    CHECK_EQ_INT(http_chunked_decode(&c, "x", 1, &used, &d, &dl), HTTP_CHUNK_DONE);
    CHECK_EQ_INT(used, 0);

    /* A 4000-digit size line is still within the line limit. */
    static char longline[4100 + 32];
    memset(longline, '0', 4000);
    memcpy(longline + 4000, "1\r\nx\r\n0\r\n\r\n", 11);
    chunk_run(longline, 4011, 4011, 0, 0, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_DONE);
    chunk_run(longline, 4011, 0, 1, 0, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_DONE);
    CHECK_STR(o.data, o.dlen, "x");
}

static void test_chunked_bad(void)
{
    CHUNK_BAD("z\r\n", "invalid chunk size");
    CHUNK_BAD("\r\n", "invalid chunk size");
    CHUNK_BAD(" 5\r\nhello\r\n0\r\n\r\n", "invalid chunk size");
    CHUNK_BAD("-5\r\nhello\r\n", "invalid chunk size");
    CHUNK_BAD("0x5\r\nhello\r\n", "invalid chunk size");
    CHUNK_BAD("5 \r\nhello\r\n0\r\n\r\n", "invalid chunk extension");
    CHUNK_BAD("ffffffffffffffffff\r\n", "chunk size overflow");
    CHUNK_BAD("4000000000000001\r\n", "chunk size overflow");
    CHUNK_BAD("5\nhello\r\n0\r\n\r\n", "bare LF in chunk framing");
    CHUNK_BAD("5;a\nhello\r\n0\r\n\r\n", "bare LF in chunk framing");
    CHUNK_BAD("5\r\rhello\r\n0\r\n\r\n", "bare CR in chunk framing");
    CHUNK_BAD("5\r\nhelloX\r\n0\r\n\r\n", "missing CRLF after chunk data");
    CHUNK_BAD("5\r\nhello\n0\r\n\r\n", "missing CRLF after chunk data");
    CHUNK_BAD("5\r\nhello\r0\r\n\r\n", "missing CRLF after chunk data");
    CHUNK_BAD("5;\r\nhello\r\n0\r\n\r\n", "invalid chunk extension");
    CHUNK_BAD("5;=x\r\nhello\r\n0\r\n\r\n", "invalid chunk extension");
    CHUNK_BAD("5;a=\r\nhello\r\n0\r\n\r\n", "invalid chunk extension");
    CHUNK_BAD("5;a b\r\nhello\r\n0\r\n\r\n", "invalid chunk extension");
    CHUNK_BAD("5;a=\"x\r\nhello\r\n0\r\n\r\n", "invalid chunk extension");
    CHUNK_BAD("5;a=\"x\"y\r\nhello\r\n0\r\n\r\n", "invalid chunk extension");
    CHUNK_BAD("5;a=b\x01\r\nhello\r\n0\r\n\r\n", "invalid chunk extension");
    CHUNK_BAD("5;a \r\nhello\r\n0\r\n\r\n", "invalid chunk extension");
    CHUNK_BAD("0\r\nX: a\r\n b\r\n\r\n", "obs-fold in trailer");
    CHUNK_BAD("0\r\nX : a\r\n\r\n", "whitespace before colon");
    CHUNK_BAD("0\r\nX: a\x01\r\n\r\n", "control character in field value");
    CHUNK_BAD("0\r\nX: a\n\r\n", "bare LF in chunk framing");
    CHUNK_BAD("0\r\nX: a\r\n\n", "bare LF in chunk framing");
    CHUNK_BAD("0\r\nX: a\r\n\rx", "bare CR in chunk framing");
    CHUNK_BAD("0\r\nNoColon\r\n\r\n", "missing colon");
    CHUNK_BAD("0\r\nX: a\rb\r\n\r\n", "bare CR");

    /* Unbounded lines are refused once past the limit. */
    static char big[5000];
    static struct chunk_out o;
    memset(big, '0', sizeof(big));
    chunk_run(big, sizeof(big), sizeof(big), 0, 0, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_ERROR);
    CHECK_REASON("chunk-size line too long");
    memcpy(big, "1;a=", 4);
    memset(big + 4, 'b', sizeof(big) - 4);
    chunk_run(big, sizeof(big), 0, 7, 0, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_ERROR);
    memcpy(big, "0\r\nX: ", 6);
    memset(big + 6, 'v', sizeof(big) - 6);
    chunk_run(big, sizeof(big), 0, 1, 0, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_ERROR);
    CHECK_REASON("trailer line too long");
    chunk_run(big, 4000, 0, 1, 0, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_MORE);

    /* Trailer section over max_trailer_bytes. */
    static const char tr[] = "0\r\nA: 1234567890\r\nB: 1234567890\r\n\r\n";
    chunk_all(tr, sizeof(tr) - 1, 20, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_ERROR);
    CHECK_EQ_INT(o.ntrailers, 1);
    chunk_run(tr, sizeof(tr) - 1, sizeof(tr) - 1, 0, 20, &o);
    CHECK_REASON("trailer section too large");
    chunk_all(tr, sizeof(tr) - 1, 32, &o);
    CHECK_EQ_INT(o.result, HTTP_CHUNK_DONE);
    CHECK_EQ_INT(o.ntrailers, 2);

    /* Errors stick. */
    struct http_chunked c;
    size_t used, dl;
    const char *d;
    http_chunked_init(&c);
    CHECK_EQ_INT(http_chunked_decode(&c, "g", 1, &used, &d, &dl), HTTP_CHUNK_ERROR);
    CHECK_EQ_INT(http_chunked_decode(&c, "5\r\nhello", 8, &used, &d, &dl), HTTP_CHUNK_ERROR);
    CHECK_EQ_INT(used, 0);
}

/* ---- helpers ---- */

static void test_helpers(void)
{
    CHECK(http_token_eq("Chunked", 7, "chunked"));
    CHECK(!http_token_eq("chunke", 6, "chunked"));
    CHECK(!http_token_eq("chunkedx", 8, "chunked"));
    CHECK(http_list_has("foo, Close ,bar", 15, "close"));
    CHECK(http_list_has(",,close", 7, "close"));
    CHECK(!http_list_has("closed, xclose", 14, "close"));
    CHECK(!http_list_has("", 0, "close"));
    CHECK(http_list_has("a,\tkeep-alive\t", 14, "keep-alive"));
    CHECK(!strcmp(http_status_reason(200), "OK"));
    CHECK(!strcmp(http_status_reason(404), "Not Found"));
    CHECK(!strcmp(http_status_reason(431), "Request Header Fields Too Large"));
    CHECK(!strcmp(http_status_reason(308), "Permanent Redirect"));
    CHECK(!strcmp(http_status_reason(505), "HTTP Version Not Supported"));
    CHECK(!strcmp(http_status_reason(299), "Unknown"));
    static const int known[] = { 100, 101, 200, 201, 202, 203, 204, 205, 206, 301, 302, 303,
                                 304, 307, 308, 400, 401, 402, 403, 404, 405, 406, 407, 408,
                                 409, 410, 411, 412, 413, 414, 415, 416, 417, 418, 421, 422,
                                 425, 426, 428, 429, 431, 451, 500, 501, 502, 503, 504, 505 };
    int all = 1;
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
        if (!strcmp(http_status_reason(known[i]), "Unknown")) {
            fprintf(stderr, "no reason phrase for %d\n", known[i]);
            all = 0;
        }
    CHECK(all);
}

/* What tunnel.c takes for a WebSocket upgrade, and for its acceptance. */
static void test_websocket_upgrade(void)
{
    static const struct {
        const char *head;
        int upgrade;
    } cases[] = {
        { "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 1 },
        { "GET /ws HTTP/1.1\r\nHost: a\r\nconnection: keep-alive, UPGRADE\r\n"
          "upgrade: WebSocket\r\n\r\n", 1 },
        { "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: upgrade\r\n"
          "Upgrade: foo, websocket\r\n\r\n", 1 },
        /* no Connection: upgrade, another protocol, a version, not GET, a body, 1.0 */
        { "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", 0 },
        { "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n", 0 },
        { "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket/13\r\n\r\n", 0 },
        { "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgraded\r\nUpgrade: websocket\r\n\r\n", 0 },
        { "POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", 0 },
        { "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
          "Content-Length: 1\r\n\r\nx", 0 },
        { "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
          "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0 },
        { "GET /ws HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", 0 },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct http_request r;
        int rc = req_once(cases[i].head, strlen(cases[i].head), &r, hdrs);
        CHECK(rc > 0);
        if (rc > 0 && tunnel_request_is_upgrade(&r) != cases[i].upgrade) {
            t_failed++;
            fprintf(stderr, "case %zu: upgrade should be %d\n", i, cases[i].upgrade);
        }
    }
    static const struct {
        const char *head;
        int ok;
    } resps[] = {
        { "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1 },
        { "HTTP/1.1 101 Switching Protocols\r\nUpgrade: WEBSOCKET\r\n\r\n", 1 },
        { "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", 0 },
        { "HTTP/1.1 101 Switching Protocols\r\n\r\n", 0 },
        { "HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n", 0 },
    };
    for (size_t i = 0; i < sizeof(resps) / sizeof(resps[0]); i++) {
        struct http_response resp = { .headers = hdrs, .max_headers_cap = NHDRS };
        size_t scanned = 0;
        int rc = http_parse_response(resps[i].head, strlen(resps[i].head), &scanned, &lim, &resp);
        CHECK(rc > 0);
        if (rc > 0 && tunnel_response_ok(&resp) != resps[i].ok) {
            t_failed++;
            fprintf(stderr, "response %zu: ok should be %d\n", i, resps[i].ok);
        }
    }
}

int main(void)
{
    test_simple_get();
    test_post_with_body();
    test_chunked_request();
    test_connection_facts();
    test_values_and_methods();
    test_targets();
    test_hosts();
    test_leading_crlf_and_pipelining();
    test_header_count();
    test_request_refusals();
    test_early_refusals();
    test_distinct_reasons();
    test_incremental_linear();
    test_responses();
    test_chunked_good();
    test_chunked_bad();
    test_helpers();
    test_websocket_upgrade();
    return test_summary();
}
