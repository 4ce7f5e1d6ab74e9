/* Tests for src/router.c. Routes are made by hand (struct config_route
 * filled directly); the randomised test compares the router with a naive
 * linear implementation of the rules in router.h. */
#include "testlib.h"
#include "config.h"
#include "router.h"

#include <stdint.h>
#include <stdlib.h>

#define GET  ROUTE_METHOD_BIT(HTTP_M_GET)
#define HEAD ROUTE_METHOD_BIT(HTTP_M_HEAD)
#define POST ROUTE_METHOD_BIT(HTTP_M_POST)
#define PUT  ROUTE_METHOD_BIT(HTTP_M_PUT)

/* Routes of the current test; freed by routes_clear. */
static struct config_route *rs[2048];
static size_t nrs;

/* other: NULL or a comma-free single unknown method token. */
static struct config_route *add(const char *host, const char *path, int exact, uint32_t methods,
                                const char *other)
{
    struct config_route *r = calloc(1, sizeof(*r));
    char name[32];
    snprintf(name, sizeof(name), "r%zu", nrs);
    r->name = strdup(name);
    r->index = nrs;
    if (host) {
        r->host = strdup(host);
        r->host_wildcard = host[0] == '*';
    }
    r->path = strdup(path);
    r->path_len = strlen(path);
    r->exact = exact;
    r->methods = methods;
    if (other) {
        r->other_methods = calloc(1, sizeof(char *));
        r->other_methods[0] = strdup(other);
        r->nother_methods = 1;
    }
    rs[nrs++] = r;
    return r;
}

static void route_free(struct config_route *r)
{
    free(r->name);
    free(r->host);
    free(r->path);
    for (size_t j = 0; j < r->nother_methods; j++)
        free(r->other_methods[j]);
    free(r->other_methods);
    free(r);
}

static void routes_clear(void)
{
    for (size_t i = 0; i < nrs; i++)
        route_free(rs[i]);
    nrs = 0;
}

static struct router *build(void)
{
    char err[256] = "";
    struct router *r = router_build(rs, nrs, err, sizeof(err));
    if (!r)
        fprintf(stderr, "router_build: %s\n", err);
    return r;
}

static const struct http_str *mstr(const char *s)
{
    static struct http_str h;
    h.p = s;
    h.len = strlen(s);
    return &h;
}

static const char *method_names[] = {
    [HTTP_M_OTHER] = "?",   [HTTP_M_GET] = "GET", [HTTP_M_HEAD] = "HEAD",
    [HTTP_M_POST] = "POST", [HTTP_M_PUT] = "PUT", [HTTP_M_DELETE] = "DELETE",
};

/* Match with a known method (or an unknown one named by other). */
static enum router_result m(const struct router *r, const char *host, const char *path,
                            enum http_method meth, const char *other,
                            const struct config_route **out)
{
    const char *name = meth == HTTP_M_OTHER ? other : method_names[meth];
    return router_match(r, host, host ? strlen(host) : 0, path, strlen(path), meth, mstr(name),
                        out);
}

/* The route matched for GET, or NULL when there is no match. */
static const struct config_route *get(const struct router *r, const char *host, const char *path)
{
    const struct config_route *out;
    return m(r, host, path, HTTP_M_GET, NULL, &out) == ROUTER_MATCH ? out : NULL;
}

static void test_host_precedence(void)
{
    struct config_route *any = add(NULL, "/", 0, 0, NULL);
    struct config_route *wild = add("*.example.com", "/", 0, 0, NULL);
    struct config_route *exact = add("api.example.com", "/", 0, 0, NULL);
    struct router *r = build();
    CHECK(r != NULL);
    CHECK(get(r, "api.example.com", "/x") == exact);
    CHECK(get(r, "x.example.com", "/x") == wild);
    CHECK(get(r, "a.b.example.com", "/x") == wild);
    CHECK(get(r, "example.com", "/x") == any);
    CHECK(get(r, "xexample.com", "/x") == any);
    CHECK(get(r, ".example.com", "/x") == any);
    CHECK(get(r, "other.org", "/") == any);
    CHECK(get(r, NULL, "/") == any);
    CHECK(get(r, "", "/") == any);
    router_free(r);
    routes_clear();
}

static void test_wildcard_depth(void)
{
    struct config_route *w1 = add("*.example.com", "/", 0, 0, NULL);
    struct config_route *w2 = add("*.b.example.com", "/", 0, 0, NULL);
    struct router *r = build();
    CHECK(get(r, "a.b.example.com", "/") == w2);
    CHECK(get(r, "x.a.b.example.com", "/") == w2);
    CHECK(get(r, "b.example.com", "/") == w1);
    CHECK(get(r, "a.example.com", "/") == w1);
    CHECK(get(r, "example.com", "/") == NULL);
    CHECK(get(r, "com", "/") == NULL);
    router_free(r);
    routes_clear();
}

static void test_host_normalisation(void)
{
    struct config_route *exact = add("api.example.com", "/", 0, 0, NULL);
    struct config_route *upper = add("Mixed.Example.com.", "/", 0, 0, NULL); /* router folds too */
    struct config_route *v6 = add("[::1]", "/", 0, 0, NULL);
    struct config_route *any = add(NULL, "/", 0, 0, NULL);
    struct router *r = build();
    CHECK(get(r, "API.Example.COM", "/") == exact);
    CHECK(get(r, "api.example.com:8443", "/") == exact);
    CHECK(get(r, "api.example.com.", "/") == exact);
    CHECK(get(r, "API.EXAMPLE.COM.:80", "/") == exact);
    CHECK(get(r, "api.example.com..", "/") == any);
    CHECK(get(r, "api.example.co", "/") == any);
    CHECK(get(r, "api.example.comm", "/") == any);
    CHECK(get(r, "mixed.example.com", "/") == upper);
    CHECK(get(r, "[::1]:8080", "/") == v6);
    CHECK(get(r, "[::1]", "/") == v6);
    CHECK(get(r, "[::2]", "/") == any);

    /* A Host over 255 bytes only reaches host-less routes. */
    char longhost[400];
    memset(longhost, 'a', sizeof(longhost) - 1);
    longhost[sizeof(longhost) - 1] = '\0';
    CHECK(get(r, longhost, "/") == any);
    router_free(r);
    routes_clear();
}

static void test_exact_and_prefix(void)
{
    struct config_route *root = add(NULL, "/", 0, 0, NULL);
    struct config_route *a_exact = add(NULL, "/a", 1, 0, NULL);
    struct config_route *a_prefix = add(NULL, "/a", 0, 0, NULL);
    struct config_route *api = add(NULL, "/api/", 0, 0, NULL);
    struct config_route *users = add(NULL, "/api/users/", 0, 0, NULL);
    struct config_route *me = add(NULL, "/api/users/me", 1, 0, NULL);
    struct router *r = build();
    CHECK(get(r, NULL, "/a") == a_exact);
    CHECK(get(r, NULL, "/a/b") == a_prefix);
    CHECK(get(r, NULL, "/ab") == a_prefix);
    CHECK(get(r, NULL, "/b") == root);
    CHECK(get(r, NULL, "/") == root);
    CHECK(get(r, NULL, "/api") == a_prefix);
    CHECK(get(r, NULL, "/api/") == api);
    CHECK(get(r, NULL, "/api/x") == api);
    CHECK(get(r, NULL, "/api/users") == api);
    CHECK(get(r, NULL, "/api/users/") == users);
    CHECK(get(r, NULL, "/api/users/1") == users);
    CHECK(get(r, NULL, "/api/users/me") == me);
    CHECK(get(r, NULL, "/api/users/me/") == users);
    CHECK(get(r, NULL, "/API/") == root); /* paths are case-sensitive */
    router_free(r);
    routes_clear();
}

static void test_methods(void)
{
    const struct config_route *out;
    struct config_route *x_get = add("h", "/x", 1, GET | HEAD, NULL);
    struct config_route *x_post = add("h", "/x", 1, POST, NULL);
    struct config_route *root_put = add("h", "/", 0, PUT, NULL);
    struct config_route *purge = add("h", "/cache/", 0, 0, "PURGE");
    add(NULL, "/", 0, 0, NULL);
    struct router *r = build();
    CHECK(r != NULL);
    CHECK_EQ_INT(m(r, "h", "/x", HTTP_M_GET, NULL, &out), ROUTER_MATCH);
    CHECK(out == x_get);
    CHECK_EQ_INT(m(r, "h", "/x", HTTP_M_HEAD, NULL, &out), ROUTER_MATCH);
    CHECK(out == x_get);
    CHECK_EQ_INT(m(r, "h", "/x", HTTP_M_POST, NULL, &out), ROUTER_MATCH); /* config order tie */
    CHECK(out == x_post);
    /* The exact routes refuse PUT; the "/" prefix of the same host takes it. */
    CHECK_EQ_INT(m(r, "h", "/x", HTTP_M_PUT, NULL, &out), ROUTER_MATCH);
    CHECK(out == root_put);
    /* Path matched in host "h" but no method fits: 405, no fall-through to
     * the host-less "/" that would take it. */
    CHECK_EQ_INT(m(r, "h", "/x", HTTP_M_DELETE, NULL, &out), ROUTER_METHOD_NOT_ALLOWED);
    CHECK(out == NULL);
    CHECK_EQ_INT(m(r, "h", "/y", HTTP_M_GET, NULL, &out), ROUTER_METHOD_NOT_ALLOWED);
    CHECK_EQ_INT(m(r, "other", "/y", HTTP_M_DELETE, NULL, &out), ROUTER_MATCH);
    CHECK(out == rs[4]);

    /* Unknown method tokens, compared case-sensitively. */
    CHECK_EQ_INT(m(r, "h", "/cache/k", HTTP_M_OTHER, "PURGE", &out), ROUTER_MATCH);
    CHECK(out == purge);
    CHECK_EQ_INT(m(r, "h", "/cache/k", HTTP_M_OTHER, "purge", &out), ROUTER_METHOD_NOT_ALLOWED);
    CHECK_EQ_INT(m(r, "h", "/cache/k", HTTP_M_OTHER, "PURG", &out), ROUTER_METHOD_NOT_ALLOWED);
    CHECK_EQ_INT(m(r, "h", "/cache/k", HTTP_M_OTHER, "BAN", &out), ROUTER_METHOD_NOT_ALLOWED);
    CHECK_EQ_INT(m(r, "h", "/cache/k", HTTP_M_PUT, NULL, &out), ROUTER_MATCH);
    CHECK(out == root_put);
    CHECK_EQ_INT(m(r, "h", "/cache/k", HTTP_M_GET, NULL, &out), ROUTER_METHOD_NOT_ALLOWED);
    /* A route without a method list takes unknown methods too. */
    CHECK_EQ_INT(m(r, "other", "/", HTTP_M_OTHER, "PURGE", &out), ROUTER_MATCH);
    CHECK_EQ_INT(router_match(r, "other", 5, "/", 1, HTTP_M_OTHER, NULL, &out), ROUTER_MATCH);
    CHECK_EQ_INT(router_match(r, "h", 1, "/cache/", 7, HTTP_M_OTHER, NULL, &out),
                 ROUTER_METHOD_NOT_ALLOWED);
    router_free(r);
    routes_clear();
}

static void test_fall_through_and_not_found(void)
{
    const struct config_route *out;
    struct config_route *h_api = add("h.example.com", "/api/", 0, 0, NULL);
    struct config_route *w_img = add("*.example.com", "/img/", 0, 0, NULL);
    struct config_route *any_root = add(NULL, "/static/", 0, 0, NULL);
    struct router *r = build();
    CHECK(get(r, "h.example.com", "/api/x") == h_api);
    CHECK(get(r, "h.example.com", "/img/x") == w_img);
    CHECK(get(r, "h.example.com", "/static/x") == any_root);
    CHECK(get(r, "z.example.com", "/api/x") == NULL);
    CHECK_EQ_INT(m(r, "h.example.com", "/other", HTTP_M_GET, NULL, &out), ROUTER_NOT_FOUND);
    CHECK(out == NULL);
    CHECK_EQ_INT(m(r, NULL, "/api/x", HTTP_M_GET, NULL, &out), ROUTER_NOT_FOUND);
    router_free(r);
    routes_clear();

    r = build(); /* no routes at all */
    CHECK(r != NULL);
    CHECK_EQ_INT(m(r, "h", "/", HTTP_M_GET, NULL, &out), ROUTER_NOT_FOUND);
    router_free(r);
}

/* Build must refuse rs[0..nrs) with a message starting with the name of
 * the route refused (the later one) and naming the earlier one. */
static void expect_refused(const char *first, const char *second, int line)
{
    char err[256] = "";
    struct router *r = router_build(rs, nrs, err, sizeof(err));
    if (r || strncmp(err, first, strlen(first)) != 0 || (second && !strstr(err, second))) {
        t_failed++;
        fprintf(stderr, "%s:%d: expected refusal naming %s, got %s \"%s\"\n", __FILE__, line, first,
                r ? "a router" : "NULL", err);
    } else {
        t_passed++;
    }
    router_free(r);
    routes_clear();
}

static void test_duplicates(void)
{
    add(NULL, "/a", 0, 0, NULL);
    add(NULL, "/a", 0, 0, NULL);
    expect_refused("r1", "r0", __LINE__);

    add("h", "/a", 1, GET, NULL);
    add("h", "/b", 1, GET, NULL);
    add("h", "/a", 1, GET | POST, NULL);
    expect_refused("r2", "r0", __LINE__);

    add("*.h", "/a", 0, GET, NULL);
    add("*.h", "/a", 0, 0, NULL);
    expect_refused("r1", "r0", __LINE__);

    add("h", "/a", 0, 0, "PURGE");
    add("h", "/a", 0, POST, "PURGE");
    expect_refused("r1", "r0", __LINE__);

    add("H.example.com", "/a", 0, 0, NULL);
    add("h.example.com.", "/a", 0, 0, NULL);
    expect_refused("r1", "r0", __LINE__);

    add(NULL, "a", 0, 0, NULL);
    expect_refused("r0", NULL, __LINE__);
    add("*", "/", 0, 0, NULL);
    expect_refused("r0", NULL, __LINE__);
    add("*h.com", "/", 0, 0, NULL);
    expect_refused("r0", NULL, __LINE__);

    /* Same path but different kind, host or methods: all fine. */
    add("h", "/a", 0, 0, NULL);
    add("h", "/a", 1, 0, NULL);
    add("*.h", "/a", 0, 0, NULL);
    add("g", "/a", 0, 0, NULL);
    add(NULL, "/a", 0, 0, NULL);
    add(NULL, "/b", 0, GET, NULL);
    add(NULL, "/b", 0, POST, "PURGE");
    add(NULL, "/b", 0, 0, "BAN");
    struct router *r = build();
    CHECK(r != NULL);
    router_free(r);
    routes_clear();
}

/* ---- randomised comparison with a naive reference ---- */

static uint64_t rng = 0x9e3779b97f4a7c15u;
static unsigned rnd(unsigned n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng % n);
}

/* A path of minlen..maxlen bytes over "/ab". */
static void rnd_path(char *buf, size_t minlen, size_t maxlen)
{
    static const char alphabet[] = "ab/";
    size_t n = minlen + rnd((unsigned)(maxlen - minlen + 1));
    buf[0] = '/';
    for (size_t i = 1; i < n; i++)
        buf[i] = alphabet[rnd(3)];
    buf[n] = '\0';
}

static int ref_overlap(const struct config_route *a, const struct config_route *b)
{
    int any_a = !a->methods && !a->nother_methods, any_b = !b->methods && !b->nother_methods;
    if (any_a || any_b || (a->methods & b->methods))
        return 1;
    return a->nother_methods && b->nother_methods &&
           strcmp(a->other_methods[0], b->other_methods[0]) == 0;
}

/* Does c duplicate one of rs[0..n)? */
static int ref_duplicate(const struct config_route *c, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const struct config_route *o = rs[i];
        int same_host = (!o->host && !c->host) || (o->host && c->host && !strcmp(o->host, c->host));
        if (same_host && o->exact == c->exact && !strcmp(o->path, c->path) && ref_overlap(o, c))
            return 1;
    }
    return 0;
}

/* How specifically route c's host matches the request host key h (already
 * lowercased, port and dot removed; NULL for none): -1 no match, 0 any
 * host, 1 + suffix length for a wildcard, 100000 for the exact host. */
static int ref_host_rank(const struct config_route *c, const char *h)
{
    if (!c->host)
        return 0;
    if (!h)
        return -1;
    if (!c->host_wildcard)
        return strcmp(c->host, h) == 0 ? 100000 : -1;
    const char *suffix = c->host + 1;
    size_t sl = strlen(suffix), hl = strlen(h);
    if (hl > sl && strcmp(h + hl - sl, suffix) == 0)
        return 1 + (int)sl;
    return -1;
}

static int ref_allows(const struct config_route *c, enum http_method meth, const char *name)
{
    if (!c->methods && !c->nother_methods)
        return 1;
    if (meth != HTTP_M_OTHER)
        return (c->methods & ROUTE_METHOD_BIT(meth)) != 0;
    return c->nother_methods && strcmp(c->other_methods[0], name) == 0;
}

/* Is a better than b (both match the path)? */
static int ref_better(const struct config_route *a, const struct config_route *b)
{
    if (a->exact != b->exact)
        return a->exact;
    if (a->path_len != b->path_len)
        return a->path_len > b->path_len;
    return a->index < b->index;
}

static enum router_result ref_match(const char *rawhost, const char *path, enum http_method meth,
                                    const char *name, const struct config_route **out)
{
    char key[512];
    const char *h = NULL;
    if (rawhost && *rawhost) {
        size_t n = strcspn(rawhost, ":");
        memcpy(key, rawhost, n);
        key[n] = '\0';
        if (n > 1 && key[n - 1] == '.')
            key[--n] = '\0';
        for (size_t i = 0; i < n; i++)
            key[i] = (char)(key[i] >= 'A' && key[i] <= 'Z' ? key[i] + 32 : key[i]);
        if (n > 0 && n <= 255)
            h = key;
    }
    *out = NULL;
    int done = 1000000; /* ranks above this were tried */
    for (;;) {
        int rank = -1;
        for (size_t i = 0; i < nrs; i++) {
            int k = ref_host_rank(rs[i], h);
            if (k < done && k > rank)
                rank = k;
        }
        if (rank < 0)
            return ROUTER_NOT_FOUND;
        int any_path = 0;
        const struct config_route *best = NULL;
        for (size_t i = 0; i < nrs; i++) {
            const struct config_route *c = rs[i];
            if (ref_host_rank(c, h) != rank)
                continue;
            int pm =
                c->exact ? strcmp(c->path, path) == 0 : strncmp(c->path, path, c->path_len) == 0;
            if (!pm)
                continue;
            any_path = 1;
            if (ref_allows(c, meth, name) && (!best || ref_better(c, best)))
                best = c;
        }
        if (best) {
            *out = best;
            return ROUTER_MATCH;
        }
        if (any_path)
            return ROUTER_METHOD_NOT_ALLOWED;
        done = rank;
    }
}

static void test_random_against_reference(void)
{
    static const char *hosts[] = { NULL,      "a.com",     "b.a.com", "x.b.a.com",
                                   "*.a.com", "*.b.a.com", "*.com",   "c.org" };
    static const struct {
        uint32_t bits;
        const char *other;
    } meths[] = {
        { 0, NULL },          { 0, NULL },    { GET, NULL },    { POST, NULL },
        { GET | HEAD, NULL }, { 0, "PURGE" }, { GET, "PURGE" }, { PUT, "BAN" },
    };
    while (nrs < 1000) {
        char path[16];
        rnd_path(path, 2, 10); /* no "/" route: leave room for "not found" */
        unsigned mi = rnd(8);
        struct config_route *c =
            add(hosts[rnd(8)], path, rnd(3) == 0, meths[mi].bits, meths[mi].other);
        if (ref_duplicate(c, nrs - 1)) {
            nrs--;
            route_free(c);
        }
    }
    struct router *r = build();
    CHECK(r != NULL);
    if (!r) {
        routes_clear();
        return;
    }
    char longhost[300];
    memset(longhost, 'x', sizeof(longhost) - 1);
    longhost[sizeof(longhost) - 1] = '\0';
    memcpy(longhost + sizeof(longhost) - 7, ".a.com", 6);
    static const char *qhosts[] = { NULL,         "",          "a.com",       "A.COM:8080",
                                    "b.a.com.",   "x.b.a.com", "y.x.b.a.com", "q.a.com",
                                    "c.org",      "com",       "zzz",         "q.com:1",
                                    "a.com.:443", "C.Org." };
    static const struct {
        enum http_method m;
        const char *name;
    } qm[] = {
        { HTTP_M_GET, "GET" },       { HTTP_M_POST, "POST" },   { HTTP_M_HEAD, "HEAD" },
        { HTTP_M_PUT, "PUT" },       { HTTP_M_OTHER, "PURGE" }, { HTTP_M_OTHER, "BAN" },
        { HTTP_M_DELETE, "DELETE" },
    };
    size_t nq = sizeof(qhosts) / sizeof(qhosts[0]);
    int mismatches = 0, counts[3] = { 0 };
    for (int i = 0; i < 30000; i++) {
        char path[24];
        rnd_path(path, 1, 14);
        unsigned hi = rnd((unsigned)nq + 1);
        const char *host = hi == nq ? longhost : qhosts[hi];
        unsigned k = rnd(7);
        const struct config_route *got, *want;
        enum router_result rg = router_match(r, host, host ? strlen(host) : 0, path, strlen(path),
                                             qm[k].m, mstr(qm[k].name), &got);
        enum router_result rw = ref_match(host, path, qm[k].m, qm[k].name, &want);
        counts[rw]++;
        if (rg != rw || got != want) {
            if (mismatches++ < 5)
                fprintf(stderr, "mismatch: host %.20s path %s method %s: got %d %s, want %d %s\n",
                        host ? host : "(none)", path, qm[k].name, rg, got ? got->name : "-", rw,
                        want ? want->name : "-");
        }
    }
    CHECK_EQ_INT(mismatches, 0);
    printf("random: %d match, %d not found, %d method not allowed\n", counts[ROUTER_MATCH],
           counts[ROUTER_NOT_FOUND], counts[ROUTER_METHOD_NOT_ALLOWED]);
    /* The sample exercises every outcome. */
    CHECK(counts[ROUTER_MATCH] > 1000);
    CHECK(counts[ROUTER_NOT_FOUND] > 100);
    CHECK(counts[ROUTER_METHOD_NOT_ALLOWED] > 100);
    router_free(r);
    routes_clear();
}

int main(void)
{
    test_host_precedence();
    test_wildcard_depth();
    test_host_normalisation();
    test_exact_and_prefix();
    test_methods();
    test_fall_through_and_not_found();
    test_duplicates();
    test_random_against_reference();
    return test_summary();
}
