/* Tests for modules/jwt_auth.c: base64url, token decoding, JWK to OpenSSL
 * key conversion (keys made here with OpenSSL, signed here, verified by
 * the module), the RFC 7515 A.1 HS256 example with a fixed clock, claim
 * checks, claim rules, the per-worker cache and its invalidation, and
 * config refusals with JSON paths. Requests and the key fetcher are
 * covered end to end (tests/e2e/test_mod_jwt_auth.py).
 *
 * The module's file is included so its static functions can be reached;
 * its descriptor is renamed so the module table's own copy still links. */
#define module_jwt_auth jwt_auth_under_test
#include "../../modules/jwt_auth.c"
#undef module_jwt_auth

#include "testlib.h"
#include "testjson.h"
#include "modules.h"

#include <openssl/core_names.h>

static double fixed_now;
static double fixed_clock(void)
{
    return fixed_now;
}


static char *b64url(const unsigned char *d, size_t n)
{
    static const char al[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char *out = malloc(n * 4 / 3 + 4), *o = out;
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16 | (uint32_t)d[i + 1] << 8 | d[i + 2];
        *o++ = al[v >> 18];
        *o++ = al[(v >> 12) & 63];
        *o++ = al[(v >> 6) & 63];
        *o++ = al[v & 63];
    }
    if (n - i == 1) {
        *o++ = al[d[i] >> 2];
        *o++ = al[(d[i] & 3) << 4];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)d[i] << 8 | d[i + 1];
        *o++ = al[v >> 10];
        *o++ = al[(v >> 4) & 63];
        *o++ = al[(v & 15) << 2];
    }
    *o = '\0';
    return out;
}

static char *b64url_str(const char *s)
{
    return b64url((const unsigned char *)s, strlen(s));
}

/* ---- base64url ------------------------------------------------------------ */

static void expect_b64(const char *in, const char *want)
{
    unsigned char out[64];
    long n = b64url_decode(in, strlen(in), out);
    if (!want) {
        CHECK_EQ_INT(n, -1);
        return;
    }
    CHECK_STR((const char *)out, n < 0 ? 0 : n, want);
}

static void test_base64url(void)
{
    expect_b64("", "");
    expect_b64("Zg", "f");
    expect_b64("Zm8", "fo");
    expect_b64("Zm9v", "foo");
    expect_b64("Zm9vYg", "foob");
    expect_b64("_-8", "\xff\xef");
    expect_b64("Z", NULL);    /* 4k+1 characters */
    expect_b64("Zg==", NULL); /* padding */
    expect_b64("Zh", NULL);   /* stray bits: not canonical */
    expect_b64("Zm9", NULL);  /* stray bits */
    expect_b64("Zm+v", NULL); /* base64, not base64url */
    expect_b64("Zm/v", NULL);
    expect_b64("Zm 9v", NULL);
    expect_b64("Zg\x00v", "f"); /* strlen stops: the NUL is never seen */
}

/* ---- token decoding --------------------------------------------------------- */

static const char *decode(const char *tok)
{
    struct jwt_token t;
    const char *why = token_decode(tok, strlen(tok), &t);
    if (!why) {
        CHECK(t.header && t.claims && t.sig && t.sig_len > 0);
        token_free(&t);
    }
    return why;
}

static char *make_token(const char *header, const char *payload, const char *sig)
{
    char *h = b64url_str(header), *p = b64url_str(payload);
    size_t n = strlen(h) + strlen(p) + strlen(sig) + 3;
    char *t = malloc(n);
    snprintf(t, n, "%s.%s.%s", h, p, sig);
    free(h);
    free(p);
    return t;
}

static void expect_decode(const char *header, const char *payload, const char *sig, const char *why)
{
    char *t = make_token(header, payload, sig);
    const char *got = decode(t);
    if (!(why ? got && strcmp(got, why) == 0 : got == NULL)) {
        t_failed++;
        fprintf(stderr, "decode %s . %s . %s: \"%s\", expected \"%s\"\n", header, payload, sig,
                got ? got : "(ok)", why ? why : "(ok)");
    } else {
        t_passed++;
    }
    free(t);
}

static void test_decode(void)
{
    const char *p = "{\"sub\":\"a\"}";
    expect_decode("{\"alg\":\"RS256\"}", p, "AAAA", NULL);
    expect_decode("{\"alg\":\"ES512\",\"kid\":\"k\"}", p, "AAAA", NULL);
    expect_decode("{\"alg\":\"none\"}", p, "AAAA", "unsupported alg");
    expect_decode("{\"alg\":\"rs256\"}", p, "AAAA", "unsupported alg");
    expect_decode("{\"alg\":\"PS256\"}", p, "AAAA", "unsupported alg");
    expect_decode("{\"alg\":7}", p, "AAAA", "token header has no alg");
    expect_decode("{}", p, "AAAA", "token header has no alg");
    expect_decode("{\"alg\":\"RS256\",\"alg\":\"HS256\"}", p, "AAAA", "malformed token header");
    expect_decode("{\"alg\":\"RS256\"}", "{\"sub\":\"a\",\"sub\":\"b\"}", "AAAA",
                  "malformed token payload");
    expect_decode("{\"alg\":\"RS256\"}", "[]", "AAAA", "malformed token payload");
    expect_decode("{\"alg\":\"RS256\"}", "{\"a\":1} x", "AAAA", "malformed token payload");
    expect_decode("{\"alg\":\"RS256\",\"crit\":[\"b64\"]}", p, "AAAA", "unsupported crit header");
    expect_decode("{\"alg\":\"RS256\",\"kid\":\"\"}", p, "AAAA", "bad kid");
    expect_decode("{\"alg\":\"RS256\",\"kid\":[]}", p, "AAAA", "bad kid");
    expect_decode("{\"alg\":\"RS256\"}", p, "", "missing signature");
    expect_decode("{\"alg\":\"RS256\"}", p, "AA=A", "malformed signature");
    expect_decode("{\"alg\":\"RS256\"}", p, "A", "malformed signature");
    expect_decode("{\"alg\":\"RS256\"}", "{\"s\":\"\\u0000\"}", "AAAA", "malformed token payload");
    CHECK(strcmp(decode("a.b"), "malformed token (not three segments)") == 0);
    CHECK(strcmp(decode("abc"), "malformed token (not three segments)") == 0);
    CHECK(strcmp(decode("a.b.c.d"), "malformed token (not three segments)") == 0);
    CHECK(strcmp(decode(".eyJ9.AAAA"), "malformed token (empty segment)") == 0);
    CHECK(strcmp(decode("...."), "malformed token (not three segments)") == 0);
}

/* ---- providers from config ---------------------------------------------------- */

static char err[1024];

static struct jwt_global *providers(const char *text)
{
    json_t *v = j(text);
    void *g = NULL;
    err[0] = '\0';
    int rc = global_parse(v, "jwt_providers", &g, err, sizeof(err));
    json_decref(v);
    if (rc != 0)
        return NULL;
    return g;
}

static void providers_refused(const char *text, const char *prefix, const char *what)
{
    struct jwt_global *g = providers(text);
    CHECK(g == NULL);
    global_free(g);
    if (strncmp(err, prefix, strlen(prefix)) != 0 || !strstr(err, what)) {
        t_failed++;
        fprintf(stderr, "providers %s\n  message \"%s\"\n  expected \"%s\" ... \"%s\"\n", text, err,
                prefix, what);
    } else {
        t_passed++;
    }
}

/* RFC 7515 appendix A.1: an HS256 JWS and its key. */
#define A1_TOKEN                                                                                  \
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9."                                                   \
    "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnV" \
    "lfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
#define A1_KEY \
    "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"
#define A1_EXP 1300819380.0

static const char *verify(struct jwt_global *g, const char *tok)
{
    struct verdict v = { NULL, 401, NULL, 0 };
    json_t *c = token_verify(g->p, g->n, tok, strlen(tok), jwt_clock(), &v);
    if (c) {
        json_decref(c);
        return NULL;
    }
    return v.why ? v.why : "?";
}

static void test_rfc7515_a1(void)
{
    struct jwt_global *g =
        providers("{'joe': {'issuer': 'joe', 'algorithms': ['HS256'], "
                  "'jwks_file': '{\\\"keys\\\": [{\\\"kty\\\": \\\"oct\\\", \\\"k\\\": \\\"" A1_KEY
                  "\\\"}]}', 'cache_size': 4}}");
    CHECK(g != NULL);
    if (!g) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    jwt_clock = fixed_clock;
    fixed_now = A1_EXP - 100;
    CHECK(verify(g, A1_TOKEN) == NULL);
    /* now served from this thread's cache */
    unsigned char hash[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)A1_TOKEN, strlen(A1_TOKEN), hash);
    CHECK(cache_get(g->p[0], hash, fixed_now) != NULL);
    CHECK(verify(g, A1_TOKEN) == NULL);
    /* exp holds, cached or not */
    fixed_now = A1_EXP;
    CHECK(cache_get(g->p[0], hash, fixed_now) == NULL);
    CHECK(verify(g, A1_TOKEN) && strcmp(verify(g, A1_TOKEN), "token expired") == 0);
    /* a new key set invalidates the entry */
    fixed_now = A1_EXP - 100;
    CHECK(verify(g, A1_TOKEN) == NULL);
    CHECK(cache_get(g->p[0], hash, fixed_now) != NULL);
    char why[128];
    struct jwt_keyset *ks =
        jwks_parse("{\"keys\": [{\"kty\": \"oct\", \"k\": \"" A1_KEY "\"}]}",
                   strlen("{\"keys\": [{\"kty\": \"oct\", \"k\": \"" A1_KEY "\"}]}"),
                   ALG_BIT(HS256), 0, why, sizeof(why));
    CHECK(ks != NULL);
    provider_set_keys(g->p[0], ks);
    CHECK(cache_get(g->p[0], hash, fixed_now) == NULL);
    CHECK(verify(g, A1_TOKEN) == NULL);
    /* a flipped signature bit */
    char *bad = strdup(A1_TOKEN);
    bad[strlen(bad) - 2] = bad[strlen(bad) - 2] == 'X' ? 'Y' : 'X';
    CHECK(verify(g, bad) && strcmp(verify(g, bad), "bad signature") == 0);
    free(bad);
    /* the cache is bounded (cap 4) and drops the least recently used */
    struct jwt_cache *c = cache_for(g->p[0]);
    json_t *cl = j("{'exp': 2e9}");
    unsigned char h[SHA256_DIGEST_LENGTH];
    for (int i = 0; i < 10; i++) {
        memset(h, i, sizeof(h));
        cache_put(g->p[0], h, g->p[0]->gen, cl, fixed_now);
        if (i == 6) { /* touch 6's elder, 5: it survives 7, 8 and 9 */
            memset(h, 5, sizeof(h));
            CHECK(cache_get(g->p[0], h, fixed_now) == cl);
        }
    }
    CHECK(c && c->n == 4 && c->cap == 4);
    for (int i = 0; i < 10; i++) {
        memset(h, i, sizeof(h));
        CHECK((cache_get(g->p[0], h, fixed_now) != NULL) == (i == 5 || i >= 7));
    }
    json_decref(cl);
    jwt_clock = NULL;
    global_free(g);
}

static void test_provider_config(void)
{
    providers_refused("[]", "jwt_providers:", "expected an object");
    providers_refused("{'a b': {}}", "jwt_providers.a b:", "provider name");
    providers_refused("{'p': 3}", "jwt_providers.p:", "expected an object");
    providers_refused(
        "{'p': {'algorithms': ['HS256'], 'secret': '0123456789abcdef0123456789abcdef'}}",
        "jwt_providers.p.issuer:", "required");
    providers_refused("{'p': {'issuer': 'i', 'secret': '0123456789abcdef0123456789abcdef'}}",
                      "jwt_providers.p.algorithms:", "required");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['HS256', 'none'], 'secret': 'x'}}",
                      "jwt_providers.p.algorithms[1]:", "never accepted");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['HS384'], "
                      "'secret': '0123456789abcdef0123456789abcdef'}}",
                      "jwt_providers.p.secret:", "at least 48 bytes");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['HS256'], 'secret': "
                      "'0123456789abcdef0123456789abcdef', 'jwks_uri': 'http://x/'}}",
                      "jwt_providers.p:", "one key source");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['HS256'], 'secret': "
                      "'0123456789abcdef0123456789abcdef', 'jwks_refresh_s': 60}}",
                      "jwt_providers.p.jwks_refresh_s:", "only for jwks_uri");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], "
                      "'jwks_uri': 'http://x/', 'jwks_refresh_s': 1}}",
                      "jwt_providers.p.jwks_refresh_s:", "from 10 to 86400");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'jwks_uri': 'x'}}",
                      "jwt_providers.p.jwks_uri:", "URL");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'jwks_uri': "
                      "'https://u:p@x/'}}",
                      "jwt_providers.p.jwks_uri:", "URL");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256']}}",
                      "jwt_providers.p:", "no keys");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'public_key': "
                      "'-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----'}}",
                      "jwt_providers.p.public_key:", "not a PEM public key");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'jwks_file': '{}'}}",
                      "jwt_providers.p.jwks_file:", "\"keys\" list");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'jwks_file': "
                      "'{\\\"keys\\\": [{\\\"kty\\\": \\\"RSA\\\", \\\"n\\\": \\\"AQAB\\\"}]}'}}",
                      "jwt_providers.p.jwks_file: keys[0]:", "\"n\" and \"e\"");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'jwks_file': "
                      "'{\\\"keys\\\": [{\\\"kty\\\": \\\"OKP\\\"}]}'}}",
                      "jwt_providers.p.jwks_file:", "no usable signing key");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['HS256'], 'jwks_file': "
                      "'{\\\"keys\\\": [{\\\"kty\\\": \\\"oct\\\", \\\"k\\\": \\\"" A1_KEY
                      "\\\", \\\"kid\\\": \\\"a\\\"}, "
                      "{\\\"kty\\\": \\\"oct\\\", \\\"k\\\": \\\"" A1_KEY
                      "\\\", \\\"kid\\\": \\\"a\\\"}]}'}}",
                      "jwt_providers.p.jwks_file: keys[1]:", "appears twice");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['HS256'], 'jwks_file': "
                      "'{\\\"keys\\\": [{\\\"kty\\\": \\\"oct\\\", \\\"k\\\": \\\"AAAA\\\"}]}'}}",
                      "jwt_providers.p.jwks_file: keys[0]:", "at least 32 bytes");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'public_key': "
                      "'/nonexistent/key.pem'}}",
                      "jwt_providers.p.public_key:", "cannot read");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'leeway_s': -1, "
                      "'jwks_uri': 'http://x/'}}",
                      "jwt_providers.p.leeway_s:", "from 0 to 600");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'jwks_uri': 'https://x/', "
                      "'ca_file': '/nonexistent/ca.pem'}}",
                      "jwt_providers.p.ca_file:", "cannot load");
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'jwks_uri': 'https://x/', "
                      "'colour': 'blue'}}",
                      "jwt_providers.p.colour:", "unknown key");

    /* accepted: discovery from an https issuer; audiences as a string */
    struct jwt_global *g = providers("{'d': {'issuer': 'https://id.example.com', 'audiences': "
                                     "'api', 'algorithms': ['RS256', 'ES256']}}");
    CHECK(g != NULL);
    if (g) {
        CHECK(g->remote && g->p[0]->discovery_url &&
              strcmp(g->p[0]->discovery_url,
                     "https://id.example.com/.well-known/openid-configuration") == 0);
        CHECK(g->p[0]->keys == NULL && g->p[0]->naudiences == 1);
    }
    global_free(g);
    /* absent section: nothing, no error */
    void *none = (void *)1;
    CHECK(global_parse(NULL, "jwt_providers", &none, err, sizeof(err)) == 0 && none == NULL);
}

/* ---- route config ------------------------------------------------------------ */

static struct jwt_global *route_g;

static int route(const char *text, struct jwt_route **out)
{
    json_t *v = j(text);
    void *cfg = NULL;
    err[0] = '\0';
    int rc = route_parse(v, "routes[0].filters[1].jwt_auth", route_g, &cfg, err, sizeof(err));
    json_decref(v);
    if (out)
        *out = cfg;
    else if (rc == 0)
        route_free(cfg);
    return rc;
}

static void route_refused(const char *text, const char *suffix, const char *what)
{
    char prefix[200];
    snprintf(prefix, sizeof(prefix), "routes[0].filters[1].jwt_auth%s:", suffix);
    CHECK_EQ_INT(route(text, NULL), -1);
    if (strncmp(err, prefix, strlen(prefix)) != 0 || !strstr(err, what)) {
        t_failed++;
        fprintf(stderr, "route %s\n  message \"%s\"\n  expected \"%s\" ... \"%s\"\n", text, err,
                prefix, what);
    } else {
        t_passed++;
    }
}

static void test_route_config(void)
{
    route_g = providers("{'a': {'issuer': 'a', 'algorithms': ['HS256'], 'secret': "
                        "'0123456789abcdef0123456789abcdef'}, 'b': {'issuer': 'https://b/', "
                        "'algorithms': ['RS256']}}");
    CHECK(route_g != NULL);
    struct jwt_route *rc = NULL;
    CHECK_EQ_INT(route("{'providers': ['a', 'b'], 'token_from': ['bearer', 'cookie:s', "
                       "'query:t', 'header:X-T'], 'required': ['sub'], 'claims': {'scope': "
                       "{'contains': 'read'}, 'lvl': {'one_of': [1, 2]}, 't': {'equals': 'x'}}, "
                       "'claims_to_headers': {'sub': 'X-User'}, 'forward_token': false, "
                       "'allow_anonymous': true, 'max_token_bytes': 4096, 'realm': 'api'}",
                       &rc),
                 0);
    if (rc) {
        CHECK(rc->nproviders == 2 && rc->nsrc == 4 && rc->src[1].kind == SRC_COOKIE &&
              rc->src[2].kind == SRC_QUERY && rc->src[3].kind == SRC_HEADER);
        CHECK(rc->nrules == 3 && rc->nhdrs == 1 && !rc->forward_token && rc->allow_anonymous);
        CHECK(rc->max_token == 4096 && strcmp(rc->realm, "api") == 0);

        json_t *c = j("{'scope': 'write read', 'lvl': 2, 't': 'x'}");
        CHECK(rule_holds(&rc->rules[0], c) && rule_holds(&rc->rules[1], c) &&
              rule_holds(&rc->rules[2], c));
        json_decref(c);
        c = j("{'scope': ['read'], 'lvl': 2.0, 't': 'X'}");
        CHECK(rule_holds(&rc->rules[0], c));
        CHECK(!rule_holds(&rc->rules[1], c)); /* 2.0 is not 2 in JSON terms here */
        CHECK(!rule_holds(&rc->rules[2], c));
        json_decref(c);
        c = j("{'scope': 'reader', 'lvl': '2'}");
        CHECK(!rule_holds(&rc->rules[0], c) && !rule_holds(&rc->rules[1], c) &&
              !rule_holds(&rc->rules[2], c));
        json_decref(c);
        route_free(rc);
    }
    CHECK_EQ_INT(route("{'provider': 'b'}", NULL), 0);
    route_refused("[]", "", "expected an object");
    route_refused("{}", "", "give \"provider\"");
    route_refused("{'provider': 'a', 'providers': ['b']}", "", "one of the two");
    route_refused("{'provider': 'zz'}", ".provider", "no provider named \"zz\"");
    route_refused("{'providers': ['a', 'zz']}", ".providers[1]", "no provider named");
    route_refused("{'providers': ['a', 'a']}", ".providers[1]", "listed twice");
    route_refused("{'providers': []}", ".providers", "non-empty");
    route_refused("{'provider': 'a', 'token_from': ['form:x']}", ".token_from[0]", "expected");
    route_refused("{'provider': 'a', 'token_from': ['query:a&b']}", ".token_from[0]", "expected");
    route_refused("{'provider': 'a', 'token_from': ['header:bad name']}", ".token_from[0]",
                  "expected");
    route_refused("{'provider': 'a', 'token_from': []}", ".token_from", "1 to 8");
    route_refused("{'provider': 'a', 'required': ['a b']}", ".required[0]", "claim name");
    route_refused("{'provider': 'a', 'claims': {'s': {'contains': []}}}", ".claims.s.contains",
                  "non-empty");
    route_refused("{'provider': 'a', 'claims': {'s': {'contains': [1]}}}", ".claims.s.contains[0]",
                  "string");
    route_refused("{'provider': 'a', 'claims': {'s': {'equals': [1]}}}", ".claims.s.equals",
                  "string, number or boolean");
    route_refused("{'provider': 'a', 'claims': {'s': {'equals': 1, 'one_of': [1]}}}", ".claims.s",
                  "expected one of");
    route_refused("{'provider': 'a', 'claims_to_headers': {'sub': 'Authorization'}}",
                  ".claims_to_headers.sub", "cannot carry");
    route_refused("{'provider': 'a', 'claims_to_headers': {'sub': 'X Y'}}",
                  ".claims_to_headers.sub", "header name");
    route_refused("{'provider': 'a', 'max_token_bytes': 100}", ".max_token_bytes", "256");
    route_refused("{'provider': 'a', 'realm': 'a\\\"b'}", ".realm", "printable");
    route_refused("{'provider': 'a', 'forward_token': 1}", ".forward_token", "true or false");
    route_refused("{'provider': 'a', 'scopes': []}", ".scopes", "unknown key");
    global_free(route_g);
    route_g = NULL;
    route_refused("{'provider': 'a'}", ".provider", "the section is missing or invalid");
}

/* ---- claims ----------------------------------------------------------------- */

static void test_claims(void)
{
    struct jwt_provider p = { .issuer = "iss", .leeway = 0, .require_exp = true };
    char *auds[] = { "api", "web" };
    json_t *c;
#define CLAIMS(text, now, want)                                                               \
    do {                                                                                      \
        c = j(text);                                                                          \
        const char *got = claims_check(&p, c, now);                                           \
        if (!((want) ? got && strcmp(got, (want) ? (want) : "") == 0 : !got)) {               \
            t_failed++;                                                                       \
            fprintf(stderr, "%d: claims %s at %.1f: \"%s\"\n", __LINE__, text, (double)(now), \
                    got ? got : "(ok)");                                                      \
        } else {                                                                              \
            t_passed++;                                                                       \
        }                                                                                     \
        json_decref(c);                                                                       \
    } while (0)
    CLAIMS("{'iss': 'iss', 'exp': 100}", 99.9, NULL);
    CLAIMS("{'iss': 'iss', 'exp': 100}", 100, "token expired");
    CLAIMS("{'iss': 'iss', 'exp': 100.5}", 100.4, NULL);
    CLAIMS("{'iss': 'iss', 'exp': '100'}", 1, "exp is not a number");
    CLAIMS("{'iss': 'iss', 'exp': null}", 1, "exp is not a number");
    CLAIMS("{'iss': 'iss'}", 1, "token has no exp");
    CLAIMS("{'iss': 'ISS', 'exp': 100}", 1, "wrong issuer");
    CLAIMS("{'exp': 100}", 1, "wrong issuer");
    CLAIMS("{'iss': 'iss', 'exp': 100, 'nbf': 50}", 49, "token not yet valid");
    CLAIMS("{'iss': 'iss', 'exp': 100, 'nbf': 50}", 50, NULL);
    CLAIMS("{'iss': 'iss', 'exp': 100, 'nbf': true}", 50, "nbf is not a number");
    CLAIMS("{'iss': 'iss', 'exp': 100, 'iat': 60}", 50, "token issued in the future");
    CLAIMS("{'iss': 'iss', 'exp': 100, 'iat': 50}", 50, NULL);
    CLAIMS("{'iss': 'iss', 'exp': 100, 'iat': 'x'}", 50, "iat is not a number");
    p.leeway = 30;
    CLAIMS("{'iss': 'iss', 'exp': 100}", 129, NULL);
    CLAIMS("{'iss': 'iss', 'exp': 100}", 130, "token expired");
    CLAIMS("{'iss': 'iss', 'exp': 100, 'nbf': 50}", 20, NULL);
    CLAIMS("{'iss': 'iss', 'exp': 100, 'nbf': 50}", 19, "token not yet valid");
    CLAIMS("{'iss': 'iss', 'exp': 100, 'iat': 60}", 30, NULL);
    p.require_exp = false;
    CLAIMS("{'iss': 'iss'}", 1e12, NULL);
    p.audiences = auds;
    p.naudiences = 2;
    CLAIMS("{'iss': 'iss'}", 1, "token has no aud");
    CLAIMS("{'iss': 'iss', 'aud': 'web'}", 1, NULL);
    CLAIMS("{'iss': 'iss', 'aud': 'Web'}", 1, "wrong audience");
    CLAIMS("{'iss': 'iss', 'aud': ['x', 'api']}", 1, NULL);
    CLAIMS("{'iss': 'iss', 'aud': ['x', 7]}", 1, "wrong audience");
    CLAIMS("{'iss': 'iss', 'aud': []}", 1, "wrong audience");
    CLAIMS("{'iss': 'iss', 'aud': {'api': 1}}", 1, "wrong audience");
#undef CLAIMS
}

/* ---- JWK conversion, signatures ------------------------------------------------ */

static char *bn_b64(EVP_PKEY *pk, const char *name)
{
    BIGNUM *bn = NULL;
    EVP_PKEY_get_bn_param(pk, name, &bn);
    unsigned char buf[600];
    int n = BN_bn2bin(bn, buf);
    BN_free(bn);
    return b64url(buf, (size_t)n);
}

/* The public JWK of pk (RSA or EC), as JSON text. */
static char *jwk_json(EVP_PKEY *pk, const char *kid, int corrupt_y)
{
    char *out = malloc(4096);
    if (EVP_PKEY_is_a(pk, "RSA")) {
        char *n = bn_b64(pk, OSSL_PKEY_PARAM_RSA_N), *e = bn_b64(pk, OSSL_PKEY_PARAM_RSA_E);
        snprintf(out, 4096, "{\"kty\":\"RSA\",\"kid\":\"%s\",\"n\":\"%s\",\"e\":\"%s\"}", kid, n,
                 e);
        free(n);
        free(e);
        return out;
    }
    char group[32];
    EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group), NULL);
    size_t half = strcmp(group, "prime256v1") == 0 ? 32 : strcmp(group, "secp384r1") == 0 ? 48 : 66;
    unsigned char bx[66], by[66];
    BIGNUM *bn = NULL;
    EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_EC_PUB_X, &bn);
    BN_bn2binpad(bn, bx, (int)half);
    BN_free(bn);
    bn = NULL;
    EVP_PKEY_get_bn_param(pk, OSSL_PKEY_PARAM_EC_PUB_Y, &bn);
    BN_bn2binpad(bn, by, (int)half);
    BN_free(bn);
    if (corrupt_y)
        by[half - 1] ^= 1;
    char *x = b64url(bx, half), *y = b64url(by, half);
    snprintf(out, 4096, "{\"kty\":\"EC\",\"kid\":\"%s\",\"crv\":\"%s\",\"x\":\"%s\",\"y\":\"%s\"}",
             kid,
             strcmp(group, "prime256v1") == 0  ? "P-256"
             : strcmp(group, "secp384r1") == 0 ? "P-384"
                                               : "P-521",
             x, y);
    free(x);
    free(y);
    return out;
}

/* A token signed by pk with alg (ECDSA signatures turned into r||s). */
static char *sign_token(EVP_PKEY *pk, int alg, const char *kid, const char *payload)
{
    char header[128];
    snprintf(header, sizeof(header), "{\"alg\":\"%s\",\"kid\":\"%s\"}", alg_table[alg].name, kid);
    char *t = make_token(header, payload, "");
    size_t in_len = strlen(t) - 1; /* without the last '.' */
    unsigned char sig[1024];
    size_t sl = sizeof(sig);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    EVP_DigestSignInit(ctx, NULL, alg_md(alg), NULL, pk);
    EVP_DigestSign(ctx, sig, &sl, (unsigned char *)t, in_len);
    EVP_MD_CTX_free(ctx);
    if (alg_table[alg].kind == KEY_EC) {
        const unsigned char *p = sig;
        ECDSA_SIG *es = d2i_ECDSA_SIG(NULL, &p, (long)sl);
        size_t n = (size_t)alg_table[alg].coord_size;
        BN_bn2binpad(ECDSA_SIG_get0_r(es), sig, (int)n);
        BN_bn2binpad(ECDSA_SIG_get0_s(es), sig + n, (int)n);
        sl = 2 * n;
        ECDSA_SIG_free(es);
    }
    char *s = b64url(sig, sl);
    char *out = malloc(strlen(t) + strlen(s) + 1);
    sprintf(out, "%s%s", t, s);
    free(t);
    free(s);
    return out;
}

static int verify_with(const char *tok, const struct jwt_key *k)
{
    struct jwt_token t;
    if (token_decode(tok, strlen(tok), &t))
        return -1;
    int ok = (k->alg_mask & ALG_BIT(t.alg)) && token_verify_sig(&t, k);
    token_free(&t);
    return ok;
}

static void test_jwk_keys(void)
{
    static const struct {
        const char *type, *arg;
        int alg;
    } kinds[] = { { "RSA", NULL, RS256 },
                  { "RSA", NULL, RS512 },
                  { "EC", "P-256", ES256 },
                  { "EC", "P-384", ES384 },
                  { "EC", "P-521", ES512 } };
    EVP_PKEY *rsa = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        EVP_PKEY *pk = rsa;
        if (kinds[i].arg)
            pk = EVP_PKEY_Q_keygen(NULL, NULL, "EC", kinds[i].arg);
        else
            EVP_PKEY_up_ref(rsa);
        CHECK(pk != NULL);
        char *text = jwk_json(pk, "k1", 0);
        json_t *jwk = j(text);
        struct jwt_key k;
        const char *why = NULL;
        CHECK_EQ_INT(jwk_load(jwk, (1u << ALG_COUNT) - 1, &k, &why), 1);
        CHECK(k.pkey && EVP_PKEY_eq(k.pkey, pk) == 1);
        CHECK(k.kid && strcmp(k.kid, "k1") == 0);
        CHECK(k.alg_mask == (kinds[i].arg ? ALG_BIT(kinds[i].alg) : ALGS_RSA));
        char *tok = sign_token(pk, kinds[i].alg, "k1", "{\"sub\":\"x\"}");
        CHECK_EQ_INT(verify_with(tok, &k), 1);
        /* another payload under the same signature */
        char *other = b64url_str("{\"sub\":\"y\"}");
        char *forged = malloc(strlen(tok) + strlen(other) + 1);
        sprintf(forged, "%.*s.%s%s", (int)(strchr(tok, '.') - tok), tok, other, strrchr(tok, '.'));
        CHECK_EQ_INT(verify_with(forged, &k), 0);
        free(forged);
        free(other);
        free(tok);
        /* a provider that accepts other algorithms only: not usable */
        struct jwt_key k2;
        CHECK_EQ_INT(jwk_load(jwk, ALGS_HMAC, &k2, &why), 0);
        key_clear(&k);
        json_decref(jwk);
        free(text);
        if (kinds[i].arg) { /* a point off the curve */
            text = jwk_json(pk, "k1", 1);
            jwk = j(text);
            why = NULL;
            CHECK_EQ_INT(jwk_load(jwk, ALGS_EC, &k, &why), -1);
            CHECK(why && strstr(why, "on the curve"));
            json_decref(jwk);
            free(text);
        }
        EVP_PKEY_free(pk);
    }
    /* an RSA signature does not verify as ES*, an HS token not with an RSA key */
    struct jwt_key k;
    const char *why;
    char *text = jwk_json(rsa, "r", 0);
    json_t *jwk = j(text);
    CHECK_EQ_INT(jwk_load(jwk, ALGS_RSA | ALGS_HMAC, &k, &why), 1);
    char *hs = make_token("{\"alg\":\"HS256\"}", "{}", "AAAA");
    CHECK_EQ_INT(verify_with(hs, &k), 0);
    free(hs);
    key_clear(&k);
    json_decref(jwk);
    free(text);
    EVP_PKEY_free(rsa);

    /* JWKs that are refused or skipped */
    static const struct {
        const char *jwk;
        int rc;
    } odd[] = {
        { "{'kty': 'RSA', 'e': 'AQAB'}", -1 },
        { "{'kty': 'RSA', 'n': 'AQAB', 'e': 'AQAB'}", -1 }, /* far too small */
        { "{'kty': 'EC', 'crv': 'P-192', 'x': 'AA', 'y': 'AA'}", -1 },
        { "{'kty': 'EC', 'crv': 'P-256', 'x': 'AAAA', 'y': 'AAAA'}", -1 },
        { "{'kty': 'OKP', 'crv': 'Ed25519', 'x': 'AAAA'}", 0 },
        { "{'kty': 'RSA', 'use': 'enc', 'n': 'AQAB', 'e': 'AQAB'}", 0 },
        { "{'kty': 'RSA', 'key_ops': ['encrypt'], 'n': 'AQAB', 'e': 'AQAB'}", 0 },
        { "{'kty': 'RSA', 'alg': 'ES256', 'n': 'AQAB', 'e': 'AQAB'}", 0 },
        { "{'kty': 'oct', 'k': 'c2hvcnQ'}", -1 },
        { "{'kty': 'oct', 'k': '" A1_KEY "', 'alg': 'HS512'}", 0 }, /* allowed: HS256 */
        { "{'kty': 'oct', 'k': 'a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2traw', 'alg': "
          "'HS256'}",
          1 }, /* 40 bytes */
        { "{'kty': 'oct', 'k': '" A1_KEY "', 'alg': 'HS256', 'use': 'sig'}", 1 },
        { "{'kid': 'x'}", -1 },
        { "{'kty': 'RSA', 'kid': 7}", -1 },
    };
    for (size_t i = 0; i < sizeof(odd) / sizeof(odd[0]); i++) {
        json_t *o = j(odd[i].jwk);
        why = NULL;
        int rc = jwk_load(o, ALGS_RSA | ALGS_EC | ALG_BIT(HS256), &k, &why);
        if (rc != odd[i].rc)
            fprintf(stderr, "jwk %s: %d, expected %d\n", odd[i].jwk, rc, odd[i].rc);
        CHECK_EQ_INT(rc, odd[i].rc);
        CHECK(rc >= 0 || why != NULL);
        if (rc > 0)
            key_clear(&k);
        json_decref(o);
    }
}

/* An oct key verifies only the HS* whose hash is no longer than it. */
static void test_oct_key_length(void)
{
    struct jwt_key k;
    const char *why = NULL;
    json_t *o =
        j("{'kty': 'oct', 'k': 'a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2traw'}"); /* 40
                                                                                               bytes
                                                                                             */
    CHECK_EQ_INT(jwk_load(o, ALG_BIT(HS512), &k, &why), -1);
    CHECK(why && strstr(why, "too short"));
    CHECK_EQ_INT(jwk_load(o, ALGS_HMAC, &k, &why), 1);
    CHECK(k.alg_mask == ALG_BIT(HS256));
    key_clear(&k);
    json_decref(o);
}

static void test_typ(void)
{
    CHECK(typ_matches("at+jwt", "at+jwt") && typ_matches("at+jwt", "AT+JWT") &&
          typ_matches("at+jwt", "application/at+jwt"));
    CHECK(!typ_matches("at+jwt", NULL) && !typ_matches("at+jwt", "JWT") &&
          !typ_matches("at+jwt", "application/") && !typ_matches("at+jwt", "at+jwt "));
    struct jwt_global *g = providers("{'joe': {'issuer': 'joe', 'algorithms': ['HS256'], 'typ': "
                                     "'at+jwt', 'jwks_file': '{\\\"keys\\\": [{\\\"kty\\\": "
                                     "\\\"oct\\\", \\\"k\\\": \\\"" A1_KEY "\\\"}]}'}}");
    CHECK(g != NULL);
    if (g) {
        jwt_clock = fixed_clock;
        fixed_now = A1_EXP - 100;
        const char *why = verify(g, A1_TOKEN); /* its typ is "JWT" */
        CHECK(why && strcmp(why, "wrong typ") == 0);
        jwt_clock = NULL;
    }
    global_free(g);
    providers_refused("{'p': {'issuer': 'i', 'algorithms': ['RS256'], 'typ': 3, "
                      "'jwks_uri': 'http://x/'}}",
                      "jwt_providers.p.typ:", "at+jwt");
}

static void test_cookie_query(void)
{
    size_t n = 0;
    const char *s = "a=1; tok=abc.def.ghi ; b=2";
    const char *v = find_pair(s, strlen(s), ';', "tok", &n);
    CHECK(v && n == 11 && strncmp(v, "abc.def.ghi", n) == 0);
    v = find_pair(s, strlen(s), ';', "to", &n);
    CHECK(v == NULL);
    s = "x=\"q.q.q\"";
    v = find_pair(s, strlen(s), ';', "x", &n);
    CHECK(v && n == 5 && strncmp(v, "q.q.q", n) == 0);
    s = "access_token=&access_token=2";
    v = find_pair(s, strlen(s), '&', "access_token", &n);
    CHECK(v && n == 0);
    s = "xaccess_token=1";
    CHECK(find_pair(s, strlen(s), '&', "access_token", &n) == NULL);
}

int main(void)
{
    if (!modules_find("jwt_auth")) {
        printf("module jwt_auth is not built in: skipped\n");
        return 77;
    }
    test_base64url();
    test_decode();
    test_rfc7515_a1();
    test_provider_config();
    test_route_config();
    test_claims();
    test_jwk_keys();
    test_oct_key_length();
    test_typ();
    test_cookie_query();
    return test_summary();
}
