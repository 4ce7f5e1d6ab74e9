#include "uri.h"

#include <string.h>

/* Character classes of RFC 3986, one table lookup per byte. */
enum {
    C_UNRES = 1, /* ALPHA DIGIT - . _ ~ */
    C_SUB = 2,   /* ! $ & ' ( ) * + , ; = */
    C_PCX = 4,   /* ':' '@': the rest of pchar */
    C_HEX = 8,
};
#define C_PCHAR (C_UNRES | C_SUB | C_PCX)

/* clang-format off */
static const unsigned char ctab[256] = {
    ['0' ... '9'] = C_UNRES | C_HEX,
    ['A' ... 'F'] = C_UNRES | C_HEX,
    ['G' ... 'Z'] = C_UNRES,
    ['a' ... 'f'] = C_UNRES | C_HEX,
    ['g' ... 'z'] = C_UNRES,
    ['-'] = C_UNRES, ['.'] = C_UNRES, ['_'] = C_UNRES, ['~'] = C_UNRES,
    ['!'] = C_SUB, ['$'] = C_SUB, ['&'] = C_SUB, ['\''] = C_SUB,
    ['('] = C_SUB, [')'] = C_SUB, ['*'] = C_SUB, ['+'] = C_SUB,
    [','] = C_SUB, [';'] = C_SUB, ['='] = C_SUB,
    [':'] = C_PCX, ['@'] = C_PCX,
};
/* clang-format on */

static const char hexdig[] = "0123456789ABCDEF";

static int hexval(unsigned char c)
{
    return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

/* The byte value of the escape at s[i] ('%'), or -1 if it is truncated or
 * not two hex digits. */
static int pct_value(const char *s, size_t len, size_t i)
{
    if (len - i < 3)
        return -1;
    unsigned char h = (unsigned char)s[i + 1], l = (unsigned char)s[i + 2];
    if (!(ctab[h] & C_HEX) || !(ctab[l] & C_HEX))
        return -1;
    return hexval(h) << 4 | hexval(l);
}

/* Every byte of s is in class, or one of the bytes of extra, or a valid
 * %-escape. */
static int span_valid(const char *s, size_t len, unsigned cls, const char *extra)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (ctab[c] & cls)
            continue;
        if (c == '%') {
            if (pct_value(s, len, i) < 0)
                return -1;
            i += 2;
            continue;
        }
        if (c == '\0' || !strchr(extra, c))
            return -1;
    }
    return 0;
}

static int scheme_is(const char *t, size_t len, const char *prefix)
{
    size_t n = strlen(prefix);
    if (len < n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((t[i] | (t[i] >= 'A' && t[i] <= 'Z' ? 0x20 : 0)) != prefix[i])
            return 0;
    return 1;
}

/* Path and query of an origin-form target, or of what follows the
 * authority in absolute-form. p[0..len) is empty or starts with '/' or '?'. */
static int split_path_query(const char *p, size_t len, struct uri_target *out)
{
    const char *q = memchr(p, '?', len);
    size_t plen = q ? (size_t)(q - p) : len;
    if (span_valid(p, plen, C_PCHAR, "/") < 0)
        return -1;
    if (plen == 0) {
        out->path = "/";
        out->path_len = 1;
    } else {
        out->path = p;
        out->path_len = plen;
    }
    if (q) {
        out->query = q + 1;
        out->query_len = len - plen - 1;
        if (span_valid(out->query, out->query_len, C_PCHAR, "/?") < 0)
            return -1;
    }
    return 0;
}

int uri_parse_target(const char *t, size_t len, struct uri_target *out)
{
    memset(out, 0, sizeof(*out));
    if (len == 0)
        return -1;
    if (len == 1 && t[0] == '*') {
        out->asterisk = 1;
        return 0;
    }
    if (t[0] == '/')
        return split_path_query(t, len, out);

    size_t skip;
    if (scheme_is(t, len, "http://"))
        skip = 7;
    else if (scheme_is(t, len, "https://"))
        skip = 8;
    else
        return -1;
    const char *a = t + skip, *end = t + len;
    const char *e = a;
    while (e < end && *e != '/' && *e != '?')
        e++;
    /* userinfo ('@') is refused: it has no place in a request and is a
     * classic way to confuse what "the host" is. */
    if (e == a || span_valid(a, (size_t)(e - a), C_UNRES | C_SUB, ":[]") < 0)
        return -1;
    out->authority = a;
    out->authority_len = (size_t)(e - a);
    return split_path_query(e, (size_t)(end - e), out);
}

/* Copy one segment (in[*ip] up to the next '/' or the end) to out at *op,
 * decoding escapes of unreserved characters and uppercasing the others.
 * Reads each escape before writing, so out may alias in (*op <= *ip). */
static int segment_copy(const char *in, size_t len, size_t *ip, char *out, size_t cap, size_t *op)
{
    size_t i = *ip, o = *op;
    while (i < len && in[i] != '/') {
        unsigned char c = (unsigned char)in[i];
        if (c == '%') {
            int v = pct_value(in, len, i);
            if (v <= 0 || v == '/' || v == '\\')
                return -1;
            i += 3;
            if (ctab[v] & C_UNRES) {
                if (o >= cap)
                    return -1;
                out[o++] = (char)v;
            } else {
                if (cap - o < 3)
                    return -1;
                out[o++] = '%';
                out[o++] = hexdig[v >> 4];
                out[o++] = hexdig[v & 15];
            }
        } else if (ctab[c] & C_PCHAR) {
            if (o >= cap)
                return -1;
            out[o++] = (char)c;
            i++;
        } else {
            return -1;
        }
    }
    *ip = i;
    *op = o;
    return 0;
}

/* Output invariant: out[0..o) starts with '/', and ends with '/' whenever
 * another segment may follow. */
int uri_normalize_path(const char *in, size_t len, char *out, size_t out_cap, size_t *out_len)
{
    if (len == 0 || in[0] != '/' || out_cap == 0)
        return -1;
    size_t i = 1, o = 1;
    out[0] = '/';
    for (;;) {
        while (i < len && in[i] == '/')
            i++;
        if (i == len)
            break;
        size_t seg = o;
        if (segment_copy(in, len, &i, out, out_cap, &o) < 0)
            return -1;
        size_t n = o - seg;
        if (n == 1 && out[seg] == '.') {
            o = seg;
        } else if (n == 2 && out[seg] == '.' && out[seg + 1] == '.') {
            if (seg == 1)
                return -1; /* above the root: hostile, not clamped */
            o = seg - 1;
            while (out[o - 1] != '/')
                o--;
        } else if (i < len) {
            if (o >= out_cap)
                return -1;
            out[o++] = '/';
        }
    }
    *out_len = o;
    return 0;
}
