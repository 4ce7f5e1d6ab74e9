/* HTTP/1.1 head parser and chunked-body decoder (RFC 9110, RFC 9112).
 *
 * Strict by design: whatever two implementations could read differently
 * (bare LF or CR, obs-fold, whitespace before a colon, Content-Length with
 * Transfer-Encoding, differing lengths, codings other than a lone chunked)
 * is refused, never forwarded.
 *
 * Cost of a head: one memchr-driven pass to find the blank line, resumable
 * through *scanned so a head trickling in byte by byte costs O(n) in total,
 * then one table-driven pass over the complete head. No allocation, no
 * copies, no strlen on the buffer.
 *
 * Limits: a NULL limits pointer, or a zero field in it, means the default
 * (16384 head bytes, 100 fields, 8192 target bytes). Heads are capped at
 * 1 GiB so that a head length always fits the int return value.
 *
 * Choices the RFC leaves open, made here:
 * - up to LEAD_CRLF_MAX empty lines before a request-line are skipped (and
 *   counted in the returned length); none before a status-line;
 * - a status-line without a reason phrase is accepted with or without the
 *   SP after the code ("HTTP/1.1 200" and "HTTP/1.1 200 "): not ambiguous;
 * - an empty Host is accepted only with an absolute-form target (whose
 *   authority then rules, RFC 9112 3.2.2); a Host containing ',' is refused
 *   (it reads as a list of hosts), as is a port of more than 5 digits or
 *   above 65535;
 * - Expect other than exactly "100-continue" leaves expect_continue 0 and
 *   the proxy decides (it may answer 417); Expect is ignored in HTTP/1.0;
 * - a malformed Transfer-Encoding list (empty element, non-token) is 400;
 *   a well-formed list other than exactly "chunked" is 501;
 * - a 1xx/204/304 response carrying Transfer-Encoding or Content-Length is
 *   accepted: http_response_body_kind() says it has no body regardless.
 */
#include "http1.h"

#include <string.h>

#define DEFAULT_HEAD_BYTES    16384
#define DEFAULT_HEADERS       100
#define DEFAULT_TARGET_BYTES  8192
#define HEAD_BYTES_CAP        ((size_t)1 << 30)
#define LEAD_CRLF_MAX         4  /* empty lines ignored before a request-line */
#define REQLINE_SLACK         64 /* method, two SP and version around a target */
#define LENGTH_MAX            ((uint64_t)1 << 62)
#define CHUNK_LINE_MAX        4096 /* chunk-size or trailer line, without CRLF */
#define TRAILER_BYTES_DEFAULT 8192

/* ---- errors ---- */

static _Thread_local const char *last_error = "";

/* Record why and return the negated status: `return refuse(400, "...")`. */
static int refuse(int status, const char *why)
{
    last_error = why;
    return -status;
}

const char *http_last_error(void)
{
    return last_error;
}

/* ---- character classes ---- */

enum {
    C_TCHAR = 1,   /* token character (RFC 9110 5.6.2) */
    C_VALUE = 2,   /* field-value byte: VCHAR, SP, HTAB, obs-text */
    C_TARGET = 4,  /* request-target byte: visible ASCII */
    C_HOST = 8,    /* reg-name byte: unreserved, sub-delims but ',' ('%' apart) */
    C_QDTEXT = 16, /* quoted-string text (RFC 9110 5.6.4) */
};
#define VIS   (C_VALUE | C_TARGET | C_QDTEXT)
#define ALNUM (VIS | C_TCHAR | C_HOST)

static const uint8_t cls[256] = {
    ['\t'] = C_VALUE | C_QDTEXT,
    [' '] = C_VALUE | C_QDTEXT,
    ['!'] = VIS | C_TCHAR | C_HOST,
    ['"'] = C_VALUE | C_TARGET,
    ['#'] = VIS,
    ['$'] = VIS | C_TCHAR | C_HOST,
    ['%'] = VIS | C_TCHAR,
    ['&'] = VIS | C_TCHAR | C_HOST,
    ['\''] = VIS | C_TCHAR | C_HOST,
    ['('] = VIS | C_HOST,
    [')'] = VIS | C_HOST,
    ['*'] = VIS | C_TCHAR | C_HOST,
    ['+'] = VIS | C_TCHAR | C_HOST,
    [','] = VIS,
    ['-'] = VIS | C_TCHAR | C_HOST,
    ['.'] = VIS | C_TCHAR | C_HOST,
    ['/'] = VIS,
    ['0' ... '9'] = ALNUM,
    [':'] = VIS,
    [';'] = VIS | C_HOST,
    ['<'] = VIS,
    ['='] = VIS | C_HOST,
    ['>'] = VIS,
    ['?'] = VIS,
    ['@'] = VIS,
    ['A' ... 'Z'] = ALNUM,
    ['['] = VIS,
    ['\\'] = C_VALUE | C_TARGET,
    [']'] = VIS,
    ['^'] = VIS | C_TCHAR,
    ['_'] = VIS | C_TCHAR | C_HOST,
    ['`'] = VIS | C_TCHAR,
    ['a' ... 'z'] = ALNUM,
    ['{'] = VIS,
    ['|'] = VIS | C_TCHAR,
    ['}'] = VIS,
    ['~'] = VIS | C_TCHAR | C_HOST,
    [0x80 ... 0xff] = C_VALUE | C_QDTEXT,
};

/* Hex digit value plus one; 0 for anything else. */
static const uint8_t unhex[256] = {
    ['0'] = 1,  ['1'] = 2,  ['2'] = 3,  ['3'] = 4,  ['4'] = 5,  ['5'] = 6,  ['6'] = 7,  ['7'] = 8,
    ['8'] = 9,  ['9'] = 10, ['a'] = 11, ['b'] = 12, ['c'] = 13, ['d'] = 14, ['e'] = 15, ['f'] = 16,
    ['A'] = 11, ['B'] = 12, ['C'] = 13, ['D'] = 14, ['E'] = 15, ['F'] = 16,
};

static inline int is_class(char c, unsigned mask)
{
    return cls[(uint8_t)c] & mask;
}

static inline int is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static inline int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Scanners for the two long runs of a head: field values (VCHAR, SP,
 * HTAB, obs-text) and request-targets (visible ASCII). Each returns the
 * first byte at or after p, before end, outside its set, or end. Sixteen
 * bytes at a time with SSE2 (baseline on x86-64), else eight with SWAR
 * arithmetic; the tables decide the tail. */
#if defined(__SSE2__)
#include <emmintrin.h>

static const char *value_end(const char *p, const char *end)
{
    const __m128i below = _mm_set1_epi8(0x1f), del = _mm_set1_epi8(0x7f);
    while (end - p >= 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(const void *)p);
        __m128i bad =
            _mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(x, below), x), _mm_cmpeq_epi8(x, del));
        unsigned m = (unsigned)_mm_movemask_epi8(bad);
        if (!m) {
            p += 16;
            continue;
        }
        p += __builtin_ctz(m);
        if (*p != '\t') /* HTAB is the one control byte allowed */
            return p;
        p++;
    }
    while (p < end && is_class(*p, C_VALUE))
        p++;
    return p;
}

static const char *target_end(const char *p, const char *end)
{
    const __m128i sp = _mm_set1_epi8(0x20), del = _mm_set1_epi8(0x7f);
    while (end - p >= 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(const void *)p);
        /* signed compares: bytes 0x80-0xff are negative, hence refused */
        __m128i good = _mm_and_si128(_mm_cmpgt_epi8(x, sp), _mm_cmplt_epi8(x, del));
        unsigned m = ~(unsigned)_mm_movemask_epi8(good) & 0xffffu;
        if (m)
            return p + __builtin_ctz(m);
        p += 16;
    }
    while (p < end && is_class(*p, C_TARGET))
        p++;
    return p;
}
#else
/* Does any byte of w fall below 0x20 or equal DEL? (exact, per the
 * classic "has less than" and "has zero byte" word tricks) */
static inline int swar_has_ctl(uint64_t w)
{
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    uint64_t x = w ^ (ones * 0x7f);
    return (((w - ones * 0x20) & ~w & highs) | ((x - ones) & ~x & highs)) != 0;
}

static const char *value_end(const char *p, const char *end)
{
    for (;;) {
        while (end - p >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            if (swar_has_ctl(w))
                break;
            p += 8;
        }
        const char *stop = end - p > 8 ? p + 8 : end;
        while (p < stop && is_class(*p, C_VALUE))
            p++;
        if (p < stop || p == end)
            return p;
    }
}

static const char *target_end(const char *p, const char *end)
{
    while (p < end && is_class(*p, C_TARGET))
        p++;
    return p;
}
#endif

/* ---- limits ---- */

struct limits {
    size_t head, headers, target;
};

static void limits_resolve(const struct http_parse_limits *in, struct limits *out)
{
    out->head = in && in->max_head_bytes ? in->max_head_bytes : DEFAULT_HEAD_BYTES;
    out->headers = in && in->max_headers ? in->max_headers : DEFAULT_HEADERS;
    out->target = in && in->max_target_bytes ? in->max_target_bytes : DEFAULT_TARGET_BYTES;
    if (out->head > HEAD_BYTES_CAP)
        out->head = HEAD_BYTES_CAP;
    if (out->target > HEAD_BYTES_CAP)
        out->target = HEAD_BYTES_CAP;
}

/* ---- finding the end of the head ---- */

/* Skip the empty lines a request may start with. Returns 1 with *lead set,
 * 0 when the buffer ends inside them, or a refusal. Looks at no more than
 * 2 * LEAD_CRLF_MAX + 2 bytes, so it is cheap to redo on every call. */
static int head_lead(const char *buf, size_t len, int is_request, size_t *lead)
{
    size_t i = 0;
    unsigned n = 0;
    while (is_request && i < len && buf[i] == '\r') {
        if (i + 1 == len)
            return 0;
        if (buf[i + 1] != '\n')
            return refuse(400, "bare CR");
        if (n++ == LEAD_CRLF_MAX)
            return refuse(400, "too many empty lines before the request-line");
        i += 2;
    }
    if (i < len && buf[i] == '\n')
        return refuse(400, "bare LF");
    *lead = i;
    return 1;
}

/* A request-line has run past max_target_bytes + REQLINE_SLACK without a
 * line end; line[0..n) is what there is. 414 when the target is what made
 * it long, 400 otherwise. */
static int reqline_overlong(const char *line, size_t n, size_t target_max)
{
    const char *sp = memchr(line, ' ', n < REQLINE_SLACK ? n : REQLINE_SLACK);
    if (!sp)
        return refuse(400, "request-line too long");
    const char *t = sp + 1, *end = line + n;
    const char *sp2 = memchr(t, ' ', (size_t)(end - t));
    if ((size_t)((sp2 ? sp2 : end) - t) > target_max)
        return refuse(414, "request-target too long");
    return refuse(400, "request-line too long");
}

/* Look for the blank line ending the head in the bytes not scanned yet.
 * Returns 1 with [*lead, *end) the head without the leading empty lines,
 * 0 when more bytes are needed (*scanned updated), or a refusal. Each '\n'
 * is checked for its '\r' as it is met, so a bare LF fails at once. */
static int head_scan(const char *buf, size_t len, size_t *scanned, const struct limits *lim,
                     int is_request, size_t *lead_out, size_t *end_out)
{
    size_t lead;
    int rc = head_lead(buf, len, is_request, &lead);
    if (rc <= 0)
        return rc;
    size_t e = len < lim->head ? len : lim->head;
    size_t s = *scanned < lead ? lead : *scanned;
    if (s > e)
        s = e;
    if (is_request) {
        /* Exactly one call covers position p, so this costs O(p) once. */
        size_t p = lead + lim->target + REQLINE_SLACK;
        if (p >= s && p < e && !memchr(buf + lead, '\n', p - lead + 1))
            return reqline_overlong(buf + lead, p - lead + 1, lim->target);
    }
    const char *q = buf + s, *qe = buf + e;
    while (q < qe) {
        const char *nl = memchr(q, '\n', (size_t)(qe - q));
        if (!nl)
            break;
        size_t i = (size_t)(nl - buf); /* i > lead: buf[lead] is not '\n' */
        if (buf[i - 1] != '\r')
            return refuse(400, "bare LF");
        if (i >= lead + 3 && buf[i - 2] == '\n') {
            *lead_out = lead;
            *end_out = i + 1;
            return 1;
        }
        q = nl + 1;
    }
    if (len > lim->head)
        return refuse(431, "head too large");
    *scanned = e;
    return 0;
}

/* ---- field lines ---- */

/* Parse one field line at p, which is not at a line start with SP/HTAB or
 * CR. The line's CRLF lies before end. Returns the start of the next line,
 * or NULL with last_error set (every fault here is a 400). */
static const char *field_parse(const char *p, const char *end, struct http_header *h)
{
    const char *n = p;
    while (p < end && is_class(*p, C_TCHAR))
        p++;
    if (p == end || *p != ':') {
        if (p < end && is_ows(*p) && p > n)
            last_error = "whitespace before colon";
        else if (p < end && *p == '\r')
            last_error = "missing colon in field line";
        else
            last_error = "invalid character in field name";
        return NULL;
    }
    if (p == n) {
        last_error = "empty field name";
        return NULL;
    }
    h->name.p = n;
    h->name.len = (size_t)(p - n);
    p++;
    while (p < end && is_ows(*p))
        p++;
    const char *v = p;
    p = value_end(p, end);
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n') {
        if (p < end && *p == '\r')
            last_error = "bare CR";
        else if (p < end && *p == '\0')
            last_error = "NUL in field value";
        else
            last_error = "control character in field value";
        return NULL;
    }
    const char *ve = p;
    while (ve > v && is_ows(ve[-1]))
        ve--;
    h->value.p = v;
    h->value.len = (size_t)(ve - v);
    return p + 2;
}

/* What the fields say about framing and the connection. */
struct facts {
    struct http_str host;
    unsigned hosts;
    int64_t content_length;
    unsigned te_fields, te_codings;
    unsigned te_unsupported : 1;
    unsigned close : 1, keep_alive : 1, expect_continue : 1, upgrade : 1;
};

/* Does token n[0..len) equal lowercase lit? n holds only tchars, so
 * folding with 0x20 cannot make a non-letter match a letter or '-'. */
static int name_is(const char *n, const char *lit, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((n[i] | 0x20) != lit[i])
            return 0;
    return 1;
}

/* Content-Length: 1*DIGIT, or a list of identical ones ("5, 5").
 * Returns 0 with *out, -1 invalid (incl. over 2^62), -2 differing. */
static int content_length_parse(const char *v, size_t n, int64_t *out)
{
    size_t i = 0;
    int64_t first = -1;
    for (;;) {
        if (i == n || !is_digit(v[i]))
            return -1;
        uint64_t x = 0;
        while (i < n && is_digit(v[i])) {
            unsigned d = (unsigned)(v[i++] - '0');
            if (x > (LENGTH_MAX - d) / 10)
                return -1;
            x = x * 10 + d;
        }
        if (first >= 0 && (uint64_t)first != x)
            return -2;
        first = (int64_t)x;
        while (i < n && is_ows(v[i]))
            i++;
        if (i == n)
            break;
        if (v[i++] != ',')
            return -1;
        while (i < n && is_ows(v[i]))
            i++;
    }
    *out = first;
    return 0;
}

/* Add one Transfer-Encoding field's codings to the tally. Returns 0 or a
 * 400 refusal for a malformed list. A coding with parameters is counted as
 * unsupported without reading the parameters. */
static int transfer_encoding_note(const char *v, size_t n, struct facts *f)
{
    size_t i = 0;
    f->te_fields++;
    for (;;) {
        size_t s = i;
        while (i < n && is_class(v[i], C_TCHAR))
            i++;
        if (i == s)
            return refuse(400, "invalid Transfer-Encoding");
        f->te_codings++;
        if (!ascii_case_eq(v + s, i - s, "chunked", 7))
            f->te_unsupported = 1;
        while (i < n && is_ows(v[i]))
            i++;
        if (i == n)
            return 0;
        if (v[i] == ';') {
            f->te_unsupported = 1;
            return 0;
        }
        if (v[i++] != ',')
            return refuse(400, "invalid Transfer-Encoding");
        while (i < n && is_ows(v[i]))
            i++;
    }
}

/* The next non-empty element of a comma-separated list, OWS trimmed, or
 * NULL at the end; *i is the cursor (start at 0). */
static const char *list_next(const char *v, size_t n, size_t *i, size_t *elen)
{
    size_t k = *i;
    while (k < n && (is_ows(v[k]) || v[k] == ','))
        k++;
    if (k == n)
        return NULL;
    size_t s = k;
    while (k < n && v[k] != ',')
        k++;
    size_t e = k;
    while (is_ows(v[e - 1]))
        e--;
    *i = k;
    *elen = e - s;
    return v + s;
}

static void connection_note(const char *v, size_t n, struct facts *f)
{
    size_t i = 0, el;
    const char *e;
    while ((e = list_next(v, n, &i, &el))) {
        if (ascii_case_eq(e, el, "close", 5))
            f->close = 1;
        else if (ascii_case_eq(e, el, "keep-alive", 10))
            f->keep_alive = 1;
    }
}

/* Fold one field into the facts. Returns 0 or a 400 refusal. */
static int field_note(const struct http_header *h, struct facts *f)
{
    const char *n = h->name.p, *v = h->value.p;
    size_t vlen = h->value.len;
    int rc;
    int64_t cl;

    switch (h->name.len) {
    case 4:
        if (!name_is(n, "host", 4))
            return 0;
        if (++f->hosts > 1)
            return refuse(400, "repeated Host");
        f->host = h->value;
        return 0;
    case 6:
        if (name_is(n, "expect", 6) && ascii_case_eq(v, vlen, "100-continue", 12))
            f->expect_continue = 1;
        return 0;
    case 7:
        if (name_is(n, "upgrade", 7))
            f->upgrade = 1;
        return 0;
    case 10:
        if (name_is(n, "connection", 10))
            connection_note(v, vlen, f);
        return 0;
    case 14:
        if (!name_is(n, "content-length", 14))
            return 0;
        rc = content_length_parse(v, vlen, &cl);
        if (rc == -1)
            return refuse(400, "invalid Content-Length");
        if (rc == -2 || (f->content_length >= 0 && f->content_length != cl))
            return refuse(400, "differing Content-Length");
        f->content_length = cl;
        return 0;
    case 17:
        if (!name_is(n, "transfer-encoding", 17))
            return 0;
        return transfer_encoding_note(v, vlen, f);
    default:
        return 0;
    }
}

/* Parse the field lines from p through the blank line that ends the head
 * at end. Returns 0, a 400 refusal, or 431 for too many fields. */
static int fields_parse(const char *p, const char *end, struct http_header *hdrs, size_t cap,
                        size_t max, size_t *nout, struct facts *f)
{
    size_t n = 0;
    if (is_ows(*p))
        return refuse(400, "whitespace after start-line");
    while (*p != '\r') {
        if (is_ows(*p))
            return refuse(400, "obs-fold");
        if (n >= max || n >= cap)
            return refuse(431, "too many header fields");
        p = field_parse(p, end, &hdrs[n]);
        if (!p)
            return -400;
        int rc = field_note(&hdrs[n], f);
        if (rc)
            return rc;
        n++;
    }
    if (end - p != 2) /* a line starting with a CR that is not a CRLF */
        return refuse(400, "bare CR");
    *nout = n;
    return 0;
}

/* ---- requests ---- */

static enum http_method method_lookup(const char *m, size_t n)
{
#define M(lit, val)             \
    if (memcmp(m, lit, n) == 0) \
        return val;
    switch (n) {
    case 3:
        M("GET", HTTP_M_GET);
        M("PUT", HTTP_M_PUT);
        break;
    case 4:
        M("POST", HTTP_M_POST);
        M("HEAD", HTTP_M_HEAD);
        break;
    case 5:
        M("PATCH", HTTP_M_PATCH);
        M("TRACE", HTTP_M_TRACE);
        break;
    case 6:
        M("DELETE", HTTP_M_DELETE);
        break;
    case 7:
        M("OPTIONS", HTTP_M_OPTIONS);
        M("CONNECT", HTTP_M_CONNECT);
        break;
    }
    return HTTP_M_OTHER;
#undef M
}

/* "http://" or "https://" (any case) and a non-empty authority. */
static int is_absolute_form(const char *t, size_t n)
{
    size_t s;
    if (n > 7 && ascii_case_eq(t, 7, "http://", 7))
        s = 7;
    else if (n > 8 && ascii_case_eq(t, 8, "https://", 8))
        s = 8;
    else
        return 0;
    return t[s] != '/' && t[s] != '?' && t[s] != '#';
}

/* request-line = method SP request-target SP HTTP-version CRLF.
 * On success *pp moves to the first field line. */
static int request_line_parse(const char **pp, const char *end, const struct limits *lim,
                              struct http_request *req)
{
    const char *p = *pp, *m = p;
    while (is_class(*p, C_TCHAR)) /* stops at the head's CR at the latest */
        p++;
    if (p == m || *p != ' ')
        return refuse(400, "invalid method");
    req->method_str.p = m;
    req->method_str.len = (size_t)(p - m);

    const char *t = ++p;
    p = target_end(p, end);
    size_t tlen = (size_t)(p - t);
    if (tlen > lim->target)
        return refuse(414, "request-target too long");
    if (tlen == 0)
        return refuse(400, "empty request-target");
    if (*p == '\r')
        return refuse(400, "missing HTTP version (HTTP/0.9 request-line)");
    if (*p != ' ')
        return refuse(400, "invalid character in request-target");
    req->target.p = t;
    req->target.len = tlen;

    p++;
    if (end - p < 10)
        return refuse(400, "invalid HTTP version");
    if (memcmp(p, "HTTP/", 5) != 0 || !is_digit(p[5]) || p[6] != '.' || !is_digit(p[7]) ||
        p[8] != '\r' || p[9] != '\n')
        return refuse(400, "invalid HTTP version");
    if (p[5] != '1' || (p[7] != '0' && p[7] != '1'))
        return refuse(505, "unsupported HTTP version");
    req->minor = p[7] - '0';

    req->method = method_lookup(m, req->method_str.len);
    if (req->method == HTTP_M_CONNECT)
        return refuse(501, "CONNECT not supported");
    if (t[0] == '*' && tlen == 1) {
        if (req->method != HTTP_M_OPTIONS)
            return refuse(400, "asterisk-form outside OPTIONS");
    } else if (t[0] != '/' && !is_absolute_form(t, tlen)) {
        return refuse(400, "invalid request-target form");
    }
    *pp = p + 10;
    return 0;
}

/* Host = uri-host [ ":" port ] with uri-host an IP-literal (IPv6 only),
 * IPv4 or reg-name; the port at most 65535. Not empty. */
static int host_valid(const char *h, size_t n)
{
    size_t i = 0;
    if (n == 0)
        return 0;
    if (h[0] == '[') {
        for (i = 1; i < n && (unhex[(uint8_t)h[i]] || h[i] == ':' || h[i] == '.'); i++)
            ;
        if (i == 1 || i == n || h[i] != ']')
            return 0;
        i++;
    } else {
        while (i < n && h[i] != ':') {
            if (h[i] == '%') {
                if (n - i < 3 || !unhex[(uint8_t)h[i + 1]] || !unhex[(uint8_t)h[i + 2]])
                    return 0;
                i += 3;
            } else if (is_class(h[i], C_HOST)) {
                i++;
            } else {
                return 0;
            }
        }
        if (i == 0)
            return 0;
    }
    if (i == n)
        return 1;
    if (h[i++] != ':' || n - i > 5)
        return 0;
    unsigned port = 0;
    for (; i < n; i++) {
        if (!is_digit(h[i]))
            return 0;
        port = port * 10 + (unsigned)(h[i] - '0');
    }
    return port <= 65535;
}

/* The framing and Host rules of RFC 9112 6.1-6.3 and 3.2 for a request. */
static int request_facts_check(const struct facts *f, struct http_request *req)
{
    if (f->hosts == 0 && req->minor == 1)
        return refuse(400, "missing Host");
    if (f->hosts) {
        if (f->host.len == 0) {
            if (!is_absolute_form(req->target.p, req->target.len))
                return refuse(400, "empty Host");
        } else if (!host_valid(f->host.p, f->host.len)) {
            return refuse(400, "invalid Host");
        }
    }
    if (f->te_fields) {
        if (f->content_length >= 0)
            return refuse(400, "content-length with transfer-encoding");
        if (req->minor == 0)
            return refuse(400, "transfer-encoding in HTTP/1.0");
        if (f->te_codings != 1 || f->te_unsupported)
            return refuse(501, "unsupported transfer coding");
        req->chunked = 1;
    }
    req->host = f->host;
    req->content_length = f->content_length;
    req->conn_close = f->close || (req->minor == 0 && !f->keep_alive);
    req->expect_continue = f->expect_continue && req->minor == 1;
    req->has_upgrade = f->upgrade;
    return 0;
}

int http_parse_request(const char *buf, size_t len, size_t *scanned,
                       const struct http_parse_limits *lim, struct http_request *req)
{
    struct limits l;
    size_t lead, end;
    limits_resolve(lim, &l);
    int rc = head_scan(buf, len, scanned, &l, 1, &lead, &end);
    if (rc <= 0)
        return rc;

    const char *p = buf + lead, *e = buf + end;
    struct facts f = { .content_length = -1 };
    req->method_str = (struct http_str){ NULL, 0 };
    req->method = HTTP_M_OTHER;
    req->target = (struct http_str){ NULL, 0 };
    req->minor = 1;
    req->nheaders = 0;
    req->host = (struct http_str){ NULL, 0 };
    req->content_length = -1;
    req->chunked = req->conn_close = req->expect_continue = req->has_upgrade = 0;

    if ((rc = request_line_parse(&p, e, &l, req)) < 0)
        return rc;
    if ((rc = fields_parse(p, e, req->headers, req->max_headers_cap, l.headers, &req->nheaders,
                           &f)) < 0)
        return rc;
    if ((rc = request_facts_check(&f, req)) < 0)
        return rc;
    return (int)end;
}

/* ---- responses ---- */

/* status-line = HTTP-version SP 3DIGIT SP [ reason-phrase ] CRLF; the last
 * SP may be missing when there is no reason. */
static int status_line_parse(const char **pp, const char *end, struct http_response *resp)
{
    const char *p = *pp;
    if (end - p < 14 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1') || p[8] != ' ')
        return refuse(502, "invalid status line");
    resp->minor = p[7] - '0';
    if (!is_digit(p[9]) || !is_digit(p[10]) || !is_digit(p[11]))
        return refuse(502, "invalid status code");
    resp->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    if (resp->status < 100 || resp->status > 599)
        return refuse(502, "invalid status code");
    p += 12;
    resp->reason.p = p;
    if (*p == ' ') {
        const char *r = ++p;
        p = value_end(p, end);
        resp->reason.p = r;
        resp->reason.len = (size_t)(p - r);
    } else if (*p != '\r') {
        return refuse(502, "invalid status code");
    }
    if (p[0] != '\r' || p[1] != '\n')
        return refuse(502, "invalid reason phrase");
    *pp = p + 2;
    return 0;
}

int http_parse_response(const char *buf, size_t len, size_t *scanned,
                        const struct http_parse_limits *lim, struct http_response *resp)
{
    struct limits l;
    size_t lead, end;
    limits_resolve(lim, &l);
    int rc = head_scan(buf, len, scanned, &l, 0, &lead, &end);
    if (rc <= 0)
        return rc < 0 ? -502 : 0;

    const char *p = buf + lead, *e = buf + end;
    struct facts f = { .content_length = -1 };
    resp->status = 0;
    resp->minor = 1;
    resp->reason = (struct http_str){ NULL, 0 };
    resp->nheaders = 0;
    resp->content_length = -1;
    resp->chunked = resp->conn_close = 0;

    if (status_line_parse(&p, e, resp) < 0)
        return -502;
    if (fields_parse(p, e, resp->headers, resp->max_headers_cap, l.headers, &resp->nheaders, &f) <
        0)
        return -502;
    if (f.te_fields) {
        if (f.content_length >= 0)
            return refuse(502, "content-length with transfer-encoding");
        if (resp->minor == 0)
            return refuse(502, "transfer-encoding in HTTP/1.0");
        if (f.te_codings != 1 || f.te_unsupported)
            return refuse(502, "unsupported transfer coding");
        resp->chunked = 1;
    }
    resp->content_length = f.content_length;
    resp->conn_close = f.close || (resp->minor == 0 && !f.keep_alive);
    return (int)end;
}

enum http_body_kind http_response_body_kind(const struct http_response *resp,
                                            enum http_method req_method)
{
    if (req_method == HTTP_M_HEAD)
        return HTTP_BODY_NONE;
    if (resp->status < 200 || resp->status == 204 || resp->status == 304)
        return HTTP_BODY_NONE;
    if (resp->chunked)
        return HTTP_BODY_CHUNKED;
    if (resp->content_length >= 0)
        return HTTP_BODY_LENGTH;
    return HTTP_BODY_UNTIL_CLOSE;
}

/* ---- chunked bodies ----
 *
 * States of the decoder (c->state low byte; during a chunk-size line the
 * bits above hold the line's length so far):
 *
 *   SIZE_FIRST -HEXDIG-> SIZE -CR-> SIZE_LF -LF-> DATA (size > 0)
 *                         |                   \-> TRAILER (size 0)
 *                         +-BWS/;-> extension states (EXT_*) -CR-> SIZE_LF
 *   DATA (remaining bytes handed out as DATA events) -> DATA_CR -> DATA_LF
 *        -> SIZE_FIRST
 *   TRAILER: a complete field line -> TRAILER event, stays; CRLF -> DONE
 *   Any fault -> ERROR, which sticks; DONE sticks too.
 *
 * Chunk-size and extension bytes are consumed as they are validated, one
 * at a time, so a line trickling in costs O(n). A trailer line must be
 * handed out whole, so it stays unconsumed until its LF arrives; the
 * offset already searched is kept in c->remaining (unused in trailers). */
enum {
    CS_SIZE_FIRST,
    CS_SIZE,
    CS_EXT_WS,         /* BWS after the size or a value, before ';' */
    CS_EXT_NAME_FIRST, /* after ';' */
    CS_EXT_NAME,
    CS_EXT_NAME_WS, /* BWS after a name, before '=' or ';' */
    CS_EXT_VALUE_FIRST,
    CS_EXT_TOKEN,
    CS_EXT_QUOTED,
    CS_EXT_QUOTED_PAIR,
    CS_EXT_QUOTED_END,
    CS_SIZE_LF,
    CS_DATA,
    CS_DATA_CR,
    CS_DATA_LF,
    CS_TRAILER,
    CS_DONE,
    CS_ERROR,
};

void http_chunked_init(struct http_chunked *c)
{
    c->state = CS_SIZE_FIRST;
    c->remaining = 0;
    c->trailer_bytes = 0;
    c->max_trailer_bytes = 0;
}

static int chunk_fail(struct http_chunked *c, const char *why)
{
    last_error = why;
    c->state = CS_ERROR;
    return HTTP_CHUNK_ERROR;
}

/* One byte of a chunk-size line: the next state, or -1 with last_error. */
static int size_line_byte(struct http_chunked *c, int st, char ch)
{
    if (ch == '\n' && st != CS_SIZE_LF)
        goto bare_lf;
    switch (st) {
    case CS_SIZE_FIRST:
    case CS_SIZE: {
        unsigned d = unhex[(uint8_t)ch];
        if (d) {
            if (c->remaining > (LENGTH_MAX - (d - 1)) >> 4)
                goto overflow;
            c->remaining = c->remaining * 16 + (d - 1);
            return CS_SIZE;
        }
        if (st == CS_SIZE_FIRST)
            goto bad_size;
        if (ch == '\r')
            return CS_SIZE_LF;
        if (ch == ';')
            return CS_EXT_NAME_FIRST;
        if (is_ows(ch))
            return CS_EXT_WS;
        goto bad_size;
    }
    case CS_EXT_WS:
        if (is_ows(ch))
            return st;
        if (ch == ';')
            return CS_EXT_NAME_FIRST;
        break;
    case CS_EXT_NAME_FIRST:
        if (is_ows(ch))
            return st;
        if (is_class(ch, C_TCHAR))
            return CS_EXT_NAME;
        break;
    case CS_EXT_NAME:
    case CS_EXT_NAME_WS:
        if (st == CS_EXT_NAME && is_class(ch, C_TCHAR))
            return st;
        if (is_ows(ch))
            return CS_EXT_NAME_WS;
        if (ch == '=')
            return CS_EXT_VALUE_FIRST;
        if (ch == ';')
            return CS_EXT_NAME_FIRST;
        if (ch == '\r' && st == CS_EXT_NAME)
            return CS_SIZE_LF;
        break;
    case CS_EXT_VALUE_FIRST:
        if (is_ows(ch))
            return st;
        if (is_class(ch, C_TCHAR))
            return CS_EXT_TOKEN;
        if (ch == '"')
            return CS_EXT_QUOTED;
        break;
    case CS_EXT_TOKEN:
    case CS_EXT_QUOTED_END:
        if (st == CS_EXT_TOKEN && is_class(ch, C_TCHAR))
            return st;
        if (is_ows(ch))
            return CS_EXT_WS;
        if (ch == ';')
            return CS_EXT_NAME_FIRST;
        if (ch == '\r')
            return CS_SIZE_LF;
        break;
    case CS_EXT_QUOTED:
        if (ch == '"')
            return CS_EXT_QUOTED_END;
        if (ch == '\\')
            return CS_EXT_QUOTED_PAIR;
        if (is_class(ch, C_QDTEXT))
            return st;
        break;
    case CS_EXT_QUOTED_PAIR:
        if (is_class(ch, C_VALUE))
            return CS_EXT_QUOTED;
        break;
    case CS_SIZE_LF:
        if (ch != '\n') {
            last_error = "bare CR in chunk framing";
            return -1;
        }
        return c->remaining ? CS_DATA : CS_TRAILER;
    }
    last_error = "invalid chunk extension";
    return -1;
bare_lf:
    last_error = "bare LF in chunk framing";
    return -1;
overflow:
    last_error = "chunk size overflow";
    return -1;
bad_size:
    last_error = "invalid chunk size";
    return -1;
}

/* In TRAILER state at buf[i]: hand out one trailer line, finish, or wait. */
static int trailer_step(struct http_chunked *c, const char *buf, size_t len, size_t i,
                        size_t *consumed, const char **data, size_t *data_len)
{
    *consumed = i;
    if (i == len)
        return HTTP_CHUNK_MORE;
    if (buf[i] == '\r') {
        if (i + 1 == len)
            return HTTP_CHUNK_MORE;
        if (buf[i + 1] != '\n')
            return chunk_fail(c, "bare CR in chunk framing");
        c->state = CS_DONE;
        *consumed = i + 2;
        return HTTP_CHUNK_DONE;
    }
    if (buf[i] == '\n')
        return chunk_fail(c, "bare LF in chunk framing");
    if (is_ows(buf[i]))
        return chunk_fail(c, "obs-fold in trailer");

    size_t avail = len - i, window = avail < CHUNK_LINE_MAX + 2 ? avail : CHUNK_LINE_MAX + 2;
    size_t from = c->remaining < window ? (size_t)c->remaining : window;
    const char *nl = memchr(buf + i + from, '\n', window - from);
    if (!nl) {
        if (avail >= CHUNK_LINE_MAX + 2)
            return chunk_fail(c, "trailer line too long");
        c->remaining = avail;
        return HTTP_CHUNK_MORE;
    }
    size_t k = (size_t)(nl - buf); /* k > i */
    if (buf[k - 1] != '\r')
        return chunk_fail(c, "bare LF in chunk framing");
    struct http_header h;
    const char *next = field_parse(buf + i, nl + 1, &h);
    if (next != nl + 1)
        return chunk_fail(c, next ? "invalid trailer field" : last_error);
    size_t max = c->max_trailer_bytes ? c->max_trailer_bytes : TRAILER_BYTES_DEFAULT;
    c->trailer_bytes += k + 1 - i;
    if (c->trailer_bytes > max)
        return chunk_fail(c, "trailer section too large");
    c->remaining = 0;
    *data = buf + i;
    *data_len = k - 1 - i;
    *consumed = k + 1;
    return HTTP_CHUNK_TRAILER;
}

int http_chunked_decode(struct http_chunked *c, const char *buf, size_t len, size_t *consumed,
                        const char **data, size_t *data_len)
{
    size_t i = 0;
    *consumed = 0;
    *data = NULL;
    *data_len = 0;
    for (;;) {
        int st = c->state & 0xff;
        switch (st) {
        case CS_DATA: {
            if (i == len)
                goto more;
            size_t n = len - i;
            if (n > c->remaining)
                n = (size_t)c->remaining;
            *data = buf + i;
            *data_len = n;
            c->remaining -= n;
            if (c->remaining == 0)
                c->state = CS_DATA_CR;
            *consumed = i + n;
            return HTTP_CHUNK_DATA;
        }
        case CS_DATA_CR:
        case CS_DATA_LF:
            if (i == len)
                goto more;
            if (buf[i] != (st == CS_DATA_CR ? '\r' : '\n')) {
                *consumed = i;
                return chunk_fail(c, "missing CRLF after chunk data");
            }
            i++;
            c->state = st == CS_DATA_CR ? CS_DATA_LF : CS_SIZE_FIRST;
            break;
        case CS_TRAILER:
            return trailer_step(c, buf, len, i, consumed, data, data_len);
        case CS_DONE:
            *consumed = i;
            return HTTP_CHUNK_DONE;
        case CS_ERROR:
            *consumed = i;
            last_error = "chunked decoder used after an error";
            return HTTP_CHUNK_ERROR;
        default: {
            unsigned line = (unsigned)c->state >> 8;
            while (i < len && st != CS_DATA && st != CS_TRAILER) {
                if (++line > CHUNK_LINE_MAX + 2) {
                    *consumed = i;
                    return chunk_fail(c, "chunk-size line too long");
                }
                st = size_line_byte(c, st, buf[i++]);
                if (st < 0) {
                    *consumed = i;
                    c->state = CS_ERROR;
                    return HTTP_CHUNK_ERROR;
                }
            }
            if (st == CS_TRAILER) {
                c->remaining = 0;
                c->trailer_bytes = 0;
            }
            c->state = st == CS_DATA || st == CS_TRAILER ? st : st | (int)(line << 8);
            if (i == len && st != CS_TRAILER && st != CS_DATA)
                goto more;
            break;
        }
        }
    }
more:
    *consumed = i;
    return HTTP_CHUNK_MORE;
}

/* ---- helpers ---- */

int http_list_has(const char *v, size_t vlen, const char *lit)
{
    size_t litlen = strlen(lit), i = 0, el;
    const char *e;
    while ((e = list_next(v, vlen, &i, &el)))
        if (ascii_case_eq(e, el, lit, litlen))
            return 1;
    return 0;
}

/* Reason phrases (RFC 9110 section 15), indexed by class then code % 100. */
static const char *const reasons_1xx[2] = {
    [0] = "Continue",
    [1] = "Switching Protocols",
};
static const char *const reasons_2xx[7] = {
    [0] = "OK",
    [1] = "Created",
    [2] = "Accepted",
    [3] = "Non-Authoritative Information",
    [4] = "No Content",
    [5] = "Reset Content",
    [6] = "Partial Content",
};
static const char *const reasons_3xx[9] = {
    [0] = "Multiple Choices",   [1] = "Moved Permanently",  [2] = "Found",
    [3] = "See Other",          [4] = "Not Modified",       [5] = "Use Proxy",
    [7] = "Temporary Redirect", [8] = "Permanent Redirect",
};
static const char *const reasons_4xx[52] = {
    [0] = "Bad Request",
    [1] = "Unauthorized",
    [2] = "Payment Required",
    [3] = "Forbidden",
    [4] = "Not Found",
    [5] = "Method Not Allowed",
    [6] = "Not Acceptable",
    [7] = "Proxy Authentication Required",
    [8] = "Request Timeout",
    [9] = "Conflict",
    [10] = "Gone",
    [11] = "Length Required",
    [12] = "Precondition Failed",
    [13] = "Content Too Large",
    [14] = "URI Too Long",
    [15] = "Unsupported Media Type",
    [16] = "Range Not Satisfiable",
    [17] = "Expectation Failed",
    [18] = "I'm a teapot",
    [21] = "Misdirected Request",
    [22] = "Unprocessable Content",
    [25] = "Too Early",
    [26] = "Upgrade Required",
    [28] = "Precondition Required",
    [29] = "Too Many Requests",
    [31] = "Request Header Fields Too Large",
    [51] = "Unavailable For Legal Reasons",
};
static const char *const reasons_5xx[6] = {
    [0] = "Internal Server Error", [1] = "Not Implemented", [2] = "Bad Gateway",
    [3] = "Service Unavailable",   [4] = "Gateway Timeout", [5] = "HTTP Version Not Supported",
};

const char *http_status_reason(int status)
{
    static const struct {
        const char *const *text;
        int n;
    } by_class[6] = {
        [1] = { reasons_1xx, (int)(sizeof(reasons_1xx) / sizeof(reasons_1xx[0])) },
        [2] = { reasons_2xx, (int)(sizeof(reasons_2xx) / sizeof(reasons_2xx[0])) },
        [3] = { reasons_3xx, (int)(sizeof(reasons_3xx) / sizeof(reasons_3xx[0])) },
        [4] = { reasons_4xx, (int)(sizeof(reasons_4xx) / sizeof(reasons_4xx[0])) },
        [5] = { reasons_5xx, (int)(sizeof(reasons_5xx) / sizeof(reasons_5xx[0])) },
    };
    if (status < 100 || status > 599)
        return "Unknown";
    int cls_i = status / 100, code = status % 100;
    if (code >= by_class[cls_i].n || !by_class[cls_i].text[code])
        return "Unknown";
    return by_class[cls_i].text[code];
}
