/* HTTP/1.1 message parsing (RFC 9110 / RFC 9112), strict.
 *
 * Pure code: no libevent, no sockets, no allocation. The parser reads bytes
 * where they lie in the caller's buffer and records spans pointing into that
 * buffer, so the buffer must stay put until the caller is done with the
 * parsed head.
 *
 * Incremental use: keep calling http_parse_request() with the same buffer as
 * it grows, passing the same *scanned each time (start it at 0). The parser
 * looks only at bytes it has not yet scanned while searching for the end of
 * the head, then parses the complete head once.
 *
 * Return convention for the head parsers:
 *   > 0   the head is complete; the value is its length in bytes (through
 *         the blank line). The body, if any, starts at buf + value.
 *   0     incomplete: more bytes are needed (and allowed by the limits).
 *   < 0   refused: the value is the negated HTTP status to answer with
 *         (-400, -414, -431, -501, -505 for requests; -502 for responses).
 *         http_last_error() names the reason, for logs and tests.
 */
#ifndef PORTICO_HTTP1_H
#define PORTICO_HTTP1_H

#include <stddef.h>
#include <stdint.h>

enum http_method {
    HTTP_M_OTHER = 0, /* a valid token we do not know; forwarded as is */
    HTTP_M_GET, HTTP_M_HEAD, HTTP_M_POST, HTTP_M_PUT, HTTP_M_DELETE,
    HTTP_M_OPTIONS, HTTP_M_PATCH, HTTP_M_TRACE, HTTP_M_CONNECT,
};

struct http_str {
    const char *p;
    size_t len;
};

struct http_header {
    struct http_str name;  /* as sent; compare case-insensitively */
    struct http_str value; /* leading and trailing OWS removed */
};

struct http_parse_limits {
    size_t max_head_bytes;   /* request/status line plus fields; over it: 431 (502 for responses) */
    size_t max_headers;      /* field lines; over it: 431 (502) */
    size_t max_target_bytes; /* request-target; over it: 414 */
};

/* Facts about the message that framing and connection handling need,
 * derived while parsing so nobody rescans the headers. */
struct http_request {
    struct http_str method_str;
    enum http_method method;
    struct http_str target;      /* raw request-target as sent */
    int minor;                   /* HTTP/1.<minor>: 0 or 1 */
    struct http_header *headers; /* caller-provided array ... */
    size_t max_headers_cap;      /* ... of this capacity (set by caller) */
    size_t nheaders;
    struct http_str host;        /* the Host field value (exactly one required for 1.1) */
    int64_t content_length;      /* -1 when absent */
    unsigned chunked : 1;        /* Transfer-Encoding: chunked (the only coding accepted) */
    unsigned conn_close : 1;     /* Connection: close, or HTTP/1.0 without keep-alive */
    unsigned expect_continue : 1;/* Expect: 100-continue */
    unsigned has_upgrade : 1;    /* an Upgrade field was present */
};

struct http_response {
    int status;                  /* 100..999 as sent (three digits) */
    int minor;
    struct http_str reason;
    struct http_header *headers;
    size_t max_headers_cap;
    size_t nheaders;
    int64_t content_length;      /* -1 when absent */
    unsigned chunked : 1;
    unsigned conn_close : 1;     /* Connection: close, or HTTP/1.0 without keep-alive */
};

/* Parse a request head. See the return convention above.
 * Refusals (each with its own http_last_error() text):
 *   400: bad request-line syntax, obs-fold, whitespace before the colon,
 *        bare LF, control characters or invalid bytes in names/values,
 *        an invalid field name, missing Host in HTTP/1.1, repeated Host,
 *        Content-Length with Transfer-Encoding, differing or invalid
 *        Content-Length, HTTP/0.9 (a request-line with no version),
 *        `*` outside OPTIONS, a target that is neither origin-form,
 *        absolute-form (http/https) nor `*`.
 *   414: target longer than max_target_bytes.
 *   431: head longer than max_head_bytes, or more than max_headers fields.
 *   501: Transfer-Encoding other than a single final "chunked"
 *        (e.g. gzip, chunked twice, or chunked not last); CONNECT.
 *   505: a version other than HTTP/1.0 or HTTP/1.1 (e.g. HTTP/2.0, HTTP/1.2).
 * Transfer-Encoding in an HTTP/1.0 request is refused with 400. */
int http_parse_request(const char *buf, size_t len, size_t *scanned,
                       const struct http_parse_limits *lim, struct http_request *req);

/* Parse an upstream's response head: as strict as requests; any fault is
 * -502. Content-Length with Transfer-Encoding, repeated or differing
 * Content-Length, invalid status line, obs-fold, bare LF: all -502. */
int http_parse_response(const char *buf, size_t len, size_t *scanned,
                        const struct http_parse_limits *lim, struct http_response *resp);

/* Static text naming why the last parse in this thread failed (thread-local). */
const char *http_last_error(void);

/* How a response's body is delimited (RFC 9112 section 6.3). */
enum http_body_kind {
    HTTP_BODY_NONE,       /* HEAD request, 1xx, 204, 304 */
    HTTP_BODY_LENGTH,     /* content_length bytes */
    HTTP_BODY_CHUNKED,
    HTTP_BODY_UNTIL_CLOSE /* neither: read until the upstream closes */
};
enum http_body_kind http_response_body_kind(const struct http_response *resp,
                                            enum http_method req_method);

/* Incremental chunked-body decoder. The caller keeps unconsumed bytes and
 * calls again with them at the front of the buffer once more arrive. */
struct http_chunked {
    int state;
    uint64_t remaining;      /* data bytes left in the current chunk */
    size_t trailer_bytes;    /* bytes of trailer section seen so far */
    size_t max_trailer_bytes;/* 0 means 8192 */
};

enum http_chunk_result {
    HTTP_CHUNK_ERROR = -1, /* invalid framing: bad size, overflow, missing CRLF, bad trailer */
    HTTP_CHUNK_MORE = 0,   /* need more bytes; *consumed says how many were used */
    HTTP_CHUNK_DATA = 1,   /* *data, *data_len: body bytes inside buf */
    HTTP_CHUNK_TRAILER = 2,/* *data, *data_len: one complete, valid trailer field line, without CRLF */
    HTTP_CHUNK_DONE = 3,   /* last-chunk and trailer section consumed */
};

void http_chunked_init(struct http_chunked *c);
/* Decode from buf[0..len). Sets *consumed to the bytes of buf this call used
 * (the caller discards them) and returns one event. Chunk extensions are
 * validated and dropped. Chunk sizes over 2^62 are an overflow error. */
int http_chunked_decode(struct http_chunked *c, const char *buf, size_t len,
                        size_t *consumed, const char **data, size_t *data_len);

/* Helpers shared with the serializer and the proxy. */
static inline char ascii_lower(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c + ('a' - 'A')) : c;
}

/* Case-insensitive (ASCII) equality of a[0..alen) and b[0..blen). */
static inline int ascii_case_eq(const char *a, size_t alen, const char *b, size_t blen)
{
    if (alen != blen)
        return 0;
    for (size_t i = 0; i < alen; i++)
        if (ascii_lower(a[i]) != ascii_lower(b[i]))
            return 0;
    return 1;
}

/* Case-insensitive equality of a token with lit. Inline: with a literal,
 * its length is a constant and most field names fail on it at once (the
 * proxy asks it about twenty times per request). */
static inline int http_token_eq(const char *a, size_t alen, const char *lit)
{
    return ascii_case_eq(a, alen, lit, __builtin_strlen(lit));
}
/* Does a comma-separated field value list contain token lit (case-insensitive)? */
int http_list_has(const char *v, size_t vlen, const char *lit);
const char *http_status_reason(int status);

#endif
