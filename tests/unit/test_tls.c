/* tls.c: the pure parts (SAN name matching, protocol names). Certificates,
 * handshakes and resumption are covered end to end in tests/e2e/test_tls.py. */
#include "tls.h"
#include "testlib.h"

#include <openssl/ssl.h>
#include <string.h>

static int m(const char *pattern, const char *host)
{
    return tls_name_match(pattern, host, strlen(host));
}

static void test_exact(void)
{
    CHECK(m("api.example.com", "api.example.com"));
    CHECK(!m("api.example.com", "api.example.co"));
    CHECK(!m("api.example.com", "xapi.example.com"));
    CHECK(!m("api.example.com", "api.example.com.evil"));
    CHECK(!m("api.example.com", ""));
    /* host is compared as given: callers lowercase both sides */
    CHECK(!m("api.example.com", "API.example.com"));
}

static void test_wildcard(void)
{
    CHECK(m("*.example.com", "a.example.com"));
    CHECK(m("*.example.com", "api-2.example.com"));
    CHECK(!m("*.example.com", "example.com")); /* the label must not be empty */
    CHECK(!m("*.example.com", ".example.com"));
    CHECK(!m("*.example.com", "a.b.example.com")); /* one label only */
    CHECK(!m("*.example.com", "aexample.com"));
    CHECK(!m("*.example.com", "a.example.org"));
    /* a bare or partial star is matched literally, never as a pattern */
    CHECK(!m("*", "a"));
    CHECK(m("*", "*"));
    CHECK(!m("a*.example.com", "ab.example.com"));
    /* the length is what counts, not a NUL */
    CHECK(tls_name_match("a.example.com", "a.example.comXYZ", 13));
}

static void test_versions(void)
{
    CHECK_EQ_INT(tls_version_parse("TLSv1"), TLS1_VERSION);
    CHECK_EQ_INT(tls_version_parse("TLSv1.0"), TLS1_VERSION);
    CHECK_EQ_INT(tls_version_parse("TLSv1.1"), TLS1_1_VERSION);
    CHECK_EQ_INT(tls_version_parse("TLSv1.2"), TLS1_2_VERSION);
    CHECK_EQ_INT(tls_version_parse("TLSv1.3"), TLS1_3_VERSION);
    CHECK_EQ_INT(tls_version_parse("SSLv3"), 0);
    CHECK_EQ_INT(tls_version_parse("tlsv1.2"), 0);
    CHECK_EQ_INT(tls_version_parse("TLSv1.4"), 0);
    CHECK_EQ_INT(tls_version_parse(""), 0);
}

int main(void)
{
    test_exact();
    test_wildcard();
    test_versions();
    return test_summary();
}
