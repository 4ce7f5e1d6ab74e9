/* Tests for src/uri.c: request-target splitting and path normalisation. */
#include "testlib.h"
#include "uri.h"

#include <stdlib.h>

#define NORM_FAIL "<refused>"

/* Normalise s; returns a static string with the result or NORM_FAIL. */
static const char *norm(const char *s)
{
    static char out[1024];
    size_t n;
    if (uri_normalize_path(s, strlen(s), out, sizeof(out) - 1, &n) < 0)
        return NORM_FAIL;
    out[n] = '\0';
    return out;
}

#define CHECK_NORM(in, want)                                                                    \
    do {                                                                                        \
        const char *_r = norm(in);                                                              \
        if (strcmp(_r, (want)) == 0)                                                            \
            t_passed++;                                                                         \
        else {                                                                                  \
            t_failed++;                                                                         \
            fprintf(stderr, "%s:%d: normalise \"%s\" gave \"%s\", expected \"%s\"\n", __FILE__, \
                    __LINE__, (in), _r, (want));                                                \
        }                                                                                       \
    } while (0)

static void test_dot_segments(void)
{
    CHECK_NORM("/", "/");
    CHECK_NORM("/api/../admin", "/admin");
    CHECK_NORM("/a/./b", "/a/b");
    CHECK_NORM("/a/b/./../c", "/a/c");
    CHECK_NORM("/./a", "/a");
    CHECK_NORM("/.", "/");
    CHECK_NORM("/a/.", "/a/");
    CHECK_NORM("/a/..", "/");
    CHECK_NORM("/a/b/..", "/a/");
    CHECK_NORM("/a/b/../", "/a/");
    CHECK_NORM("/a/b/../..", "/");
    CHECK_NORM("/..", NORM_FAIL);
    CHECK_NORM("/../a", NORM_FAIL);
    CHECK_NORM("/a/../..", NORM_FAIL);
    CHECK_NORM("/a/b/../../..", NORM_FAIL);
    CHECK_NORM("/./..", NORM_FAIL);
    CHECK_NORM("/a/..b", "/a/..b");
    CHECK_NORM("/a/b..", "/a/b..");
    CHECK_NORM("/a/.b/", "/a/.b/");
    CHECK_NORM("/a/.../b", "/a/.../b");
    CHECK_NORM("/a//..//b", "/b");
    CHECK_NORM("/a/bb/cc/../../d", "/a/d");
}

static void test_slashes(void)
{
    CHECK_NORM("//a///b", "/a/b");
    CHECK_NORM("//", "/");
    CHECK_NORM("/a//", "/a/");
    CHECK_NORM("/a/b/", "/a/b/");
    CHECK_NORM("///", "/");
}

static void test_escapes(void)
{
    CHECK_NORM("/%61%70%69/x", "/api/x");
    CHECK_NORM("/%41%5a%7E%2D%5f", "/AZ~-_");
    CHECK_NORM("/a%2fb", NORM_FAIL);
    CHECK_NORM("/a%2Fb", NORM_FAIL);
    CHECK_NORM("/a%5cb", NORM_FAIL);
    CHECK_NORM("/%2e%2e/x", NORM_FAIL); /* ".." at the root */
    CHECK_NORM("/a/%2e%2e/x", "/x");
    CHECK_NORM("/a/%2E%2E/b", "/b");
    CHECK_NORM("/a/.%2e/b", "/b");
    CHECK_NORM("/a/%2e/b", "/a/b");
    CHECK_NORM("/a/%2e%2e%2e/b", "/a/.../b");
    CHECK_NORM("/a%zz", NORM_FAIL);
    CHECK_NORM("/a%4", NORM_FAIL);
    CHECK_NORM("/a%", NORM_FAIL);
    CHECK_NORM("/a%g0", NORM_FAIL);
    CHECK_NORM("/%00", NORM_FAIL);
    CHECK_NORM("/a%c3%a9", "/a%C3%A9");
    CHECK_NORM("/a%3a%40%3f%23%20", "/a%3A%40%3F%23%20");
    CHECK_NORM("/%25", "/%25");
    CHECK_NORM("/%2541", "/%2541"); /* decoding happens once */
}

static void test_bad_input(void)
{
    CHECK_NORM("", NORM_FAIL);
    CHECK_NORM("a/b", NORM_FAIL);
    CHECK_NORM("/a b", NORM_FAIL);
    CHECK_NORM("/a\\b", NORM_FAIL);
    CHECK_NORM("/a?b", NORM_FAIL);
    CHECK_NORM("/a#b", NORM_FAIL);
    CHECK_NORM("/\xc3\xa9", NORM_FAIL);
    CHECK_NORM("/a\x7f", NORM_FAIL);
    CHECK_NORM("/!$&'()*+,;=:@-._~", "/!$&'()*+,;=:@-._~");

    /* An embedded NUL is a byte like any other, and refused. */
    char out[16];
    size_t n;
    CHECK_EQ_INT(uri_normalize_path("/a\0b", 4, out, sizeof(out), &n), -1);

    /* Capacity: exact fit works, one less is refused. */
    CHECK_EQ_INT(uri_normalize_path("/abc/%7e", 8, out, 6, &n), 0);
    CHECK_STR(out, n, "/abc/~");
    CHECK_EQ_INT(uri_normalize_path("/abc/%7e", 8, out, 5, &n), -1);
    CHECK_EQ_INT(uri_normalize_path("/abc/%C3", 8, out, 7, &n), -1);
    CHECK_EQ_INT(uri_normalize_path("/abc/%C3", 8, out, 8, &n), 0);
}

static void test_in_place_and_idempotent(void)
{
    const char *cases[] = { "/a/./b/../%63%2e%2e/d//e/%c3%a9/.", "//x/%7e/../y/", "/%2E/a" };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char buf[64], again[64];
        size_t n, m;
        strcpy(buf, cases[i]);
        const char *want = norm(cases[i]);
        CHECK(strcmp(want, NORM_FAIL) != 0);
        CHECK_EQ_INT(uri_normalize_path(buf, strlen(buf), buf, sizeof(buf), &n), 0);
        CHECK_STR(buf, n, want);
        CHECK_EQ_INT(uri_normalize_path(buf, n, again, sizeof(again), &m), 0);
        CHECK_STR(again, m, want);
    }
}

static int parse(const char *t, struct uri_target *u)
{
    return uri_parse_target(t, strlen(t), u);
}

static void test_parse_origin_form(void)
{
    struct uri_target u;
    CHECK_EQ_INT(parse("/a/b?x=1&y=%20", &u), 0);
    CHECK_STR(u.path, u.path_len, "/a/b");
    CHECK_STR(u.query, u.query_len, "x=1&y=%20");
    CHECK(u.authority == NULL);
    CHECK_EQ_INT(u.asterisk, 0);

    CHECK_EQ_INT(parse("/", &u), 0);
    CHECK_STR(u.path, u.path_len, "/");
    CHECK(u.query == NULL);

    CHECK_EQ_INT(parse("/p?", &u), 0);
    CHECK(u.query != NULL);
    CHECK_EQ_INT(u.query_len, 0);

    CHECK_EQ_INT(parse("/p?a?b/c:@", &u), 0);
    CHECK_STR(u.query, u.query_len, "a?b/c:@");

    CHECK_EQ_INT(parse("/a%2Fb", &u), 0); /* parse accepts; normalise refuses */
    CHECK_EQ_INT(parse("//a", &u), 0);

    CHECK_EQ_INT(parse("/a#f", &u), -1);
    CHECK_EQ_INT(parse("/a?b#f", &u), -1);
    CHECK_EQ_INT(parse("/a b", &u), -1);
    CHECK_EQ_INT(parse("/a\\b", &u), -1);
    CHECK_EQ_INT(parse("/\x01", &u), -1);
    CHECK_EQ_INT(parse("/\xc3\xa9", &u), -1);
    CHECK_EQ_INT(parse("/a%zz", &u), -1);
    CHECK_EQ_INT(parse("/a?q=%4", &u), -1);
    CHECK_EQ_INT(parse("/a?q=%zz", &u), -1);
    CHECK_EQ_INT(parse("/a?q= ", &u), -1);
    CHECK_EQ_INT(parse("/a?q=[", &u), -1);
    CHECK_EQ_INT(parse("", &u), -1);
    CHECK_EQ_INT(parse("a/b", &u), -1);
    CHECK_EQ_INT(uri_parse_target("/a\0b", 4, &u), -1);
}

static void test_parse_absolute_form(void)
{
    struct uri_target u;
    CHECK_EQ_INT(parse("http://example.com:8080/a?b", &u), 0);
    CHECK_STR(u.authority, u.authority_len, "example.com:8080");
    CHECK_STR(u.path, u.path_len, "/a");
    CHECK_STR(u.query, u.query_len, "b");

    CHECK_EQ_INT(parse("HTTPS://Example.COM", &u), 0);
    CHECK_STR(u.authority, u.authority_len, "Example.COM");
    CHECK_STR(u.path, u.path_len, "/");
    CHECK(u.query == NULL);

    CHECK_EQ_INT(parse("hTtP://h?x=1", &u), 0);
    CHECK_STR(u.authority, u.authority_len, "h");
    CHECK_STR(u.path, u.path_len, "/");
    CHECK_STR(u.query, u.query_len, "x=1");

    CHECK_EQ_INT(parse("http://[::1]:80/x", &u), 0);
    CHECK_STR(u.authority, u.authority_len, "[::1]:80");

    CHECK_EQ_INT(parse("http://user@host/", &u), -1);
    CHECK_EQ_INT(parse("http:///a", &u), -1);
    CHECK_EQ_INT(parse("http://", &u), -1);
    CHECK_EQ_INT(parse("http://?x", &u), -1);
    CHECK_EQ_INT(parse("http:/a", &u), -1);
    CHECK_EQ_INT(parse("ftp://host/", &u), -1);
    CHECK_EQ_INT(parse("httpx://host/", &u), -1);
    CHECK_EQ_INT(parse("http://ho st/", &u), -1);
    CHECK_EQ_INT(parse("http://host#f", &u), -1);
    CHECK_EQ_INT(parse("http://host/#f", &u), -1);
    CHECK_EQ_INT(parse("http://ho%zzst/", &u), -1);
}

static void test_parse_asterisk(void)
{
    struct uri_target u;
    CHECK_EQ_INT(parse("*", &u), 0);
    CHECK_EQ_INT(u.asterisk, 1);
    CHECK(u.path == NULL);
    CHECK_EQ_INT(parse("**", &u), -1);
    CHECK_EQ_INT(parse("*/", &u), -1);
}

int main(void)
{
    test_dot_segments();
    test_slashes();
    test_escapes();
    test_bad_input();
    test_in_place_and_idempotent();
    test_parse_origin_form();
    test_parse_absolute_form();
    test_parse_asterisk();
    return test_summary();
}
