/* libFuzzer target for src/uri.c: uri_parse_target and uri_normalize_path.
 *
 * Checks, for every path the normaliser accepts (both the path of a parsed
 * request-target and the raw input taken as a path):
 *   - the output is no longer than the input and starts with '/';
 *   - it has no "//", no "." or ".." segment;
 *   - every remaining escape is %HH with uppercase hex, is not %00, %2F or
 *     %5C, and does not encode an unreserved character (so no "%2e");
 *   - normalising it again gives the same bytes (idempotence);
 *   - normalising in place gives the same bytes as into another buffer.
 * Build: clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc
 *        tests/fuzz/fuzz_uri.c src/uri.c src/log.c */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "uri.h"

static int is_unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_' || c == '~';
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1; /* lowercase hex is a failure too */
}

static int is_dot_segment(const char *s, size_t len)
{
    return (len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.');
}

static void check_normal_form(const char *p, size_t n)
{
    if (n == 0 || p[0] != '/')
        abort();
    size_t seg = 1;
    for (size_t i = 1; i <= n; i++) {
        if (i == n || p[i] == '/') {
            if (i < n && i == seg)
                abort(); /* "//" */
            if (is_dot_segment(p + seg, i - seg))
                abort();
            seg = i + 1;
            continue;
        }
        if (p[i] == '%') {
            if (n - i < 3)
                abort();
            int h = hexval((unsigned char)p[i + 1]), l = hexval((unsigned char)p[i + 2]);
            if (h < 0 || l < 0)
                abort();
            int v = h << 4 | l;
            if (v == 0 || v == '/' || v == '\\' || is_unreserved((unsigned char)v))
                abort();
            i += 2;
        }
    }
}

static void check_path(const char *in, size_t len)
{
    char *out = malloc(len ? len : 1);
    size_t n;
    /* The output never exceeds the input: a buffer of exactly len must do. */
    if (uri_normalize_path(in, len, out, len, &n) == 0) {
        if (n > len)
            abort();
        check_normal_form(out, n);

        char *again = malloc(n);
        size_t m;
        if (uri_normalize_path(out, n, again, n, &m) != 0 || m != n || memcmp(again, out, n) != 0)
            abort();
        free(again);

        char *inplace = malloc(len);
        memcpy(inplace, in, len);
        if (uri_normalize_path(inplace, len, inplace, len, &m) != 0 || m != n ||
            memcmp(inplace, out, n) != 0)
            abort();
        free(inplace);
    }
    free(out);
}

static void check_span(const char *base, size_t len, const char *p, size_t n)
{
    if (p && (p < base || p + n > base + len))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A private copy, so ASan flags any read past the end. */
    char *t = malloc(size ? size : 1);
    memcpy(t, data, size);

    struct uri_target u;
    if (uri_parse_target(t, size, &u) == 0) {
        if (u.asterisk) {
            if (size != 1 || u.path)
                abort();
        } else {
            if (!u.path || u.path_len == 0 || u.path[0] != '/')
                abort();
            if (!(u.path_len == 1 && u.path[0] == '/'))
                check_span(t, size, u.path, u.path_len);
            check_span(t, size, u.query, u.query_len);
            check_span(t, size, u.authority, u.authority_len);
            if (u.authority && (u.authority_len == 0 || memchr(u.authority, '@', u.authority_len)))
                abort();
            if (memchr(t, '#', size))
                abort();
            check_path(u.path, u.path_len);
        }
    }
    check_path(t, size);
    free(t);
    return 0;
}
