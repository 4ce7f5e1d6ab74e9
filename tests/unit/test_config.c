/* Tests for src/config.c and src/addr.c. */
#define _GNU_SOURCE
#include <sched.h>
#include "testlib.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <unistd.h>

#include "addr.h"
#include "config.h"
#include "modules.h"
#include "resil.h"
#include "router.h"

#define SECRET_MARKER "zq-SECRET-MARKER-91f3"

/* JSON written with ' for " so the tests stay readable. */
static char *j(const char *s)
{
    char *out = strdup(s);
    for (char *p = out; *p; p++)
        if (*p == '\'')
            *p = '"';
    return out;
}

static struct config *load(const char *text, struct config_errors *e)
{
    char *json = j(text);
    memset(e, 0, sizeof(*e));
    struct config *c = config_load_string(json, NULL, e);
    free(json);
    return c;
}

static void dump(const struct config_errors *e)
{
    for (size_t i = 0; i < e->n; i++)
        fprintf(stderr, "    error: %s\n", e->msgs[i]);
}

static int has_msg(const struct config_errors *e, const char *want)
{
    for (size_t i = 0; i < e->n; i++)
        if (strstr(e->msgs[i], want))
            return 1;
    return 0;
}

static int no_marker(const struct config_errors *e)
{
    for (size_t i = 0; i < e->n; i++)
        if (strstr(e->msgs[i], SECRET_MARKER))
            return 0;
    return 1;
}

/* The load must fail and some message must contain want. */
static void expect_error(int line, const char *text, const char *want)
{
    struct config_errors e;
    struct config *c = load(text, &e);
    if (c || !has_msg(&e, want)) {
        t_failed++;
        fprintf(stderr, "%s:%d: expected an error containing [%s]%s\n", __FILE__, line, want,
                c ? " but the config loaded" : "; got:");
        dump(&e);
    } else {
        t_passed++;
    }
    CHECK(no_marker(&e));
    config_unref(c);
    config_errors_free(&e);
}
#define EXPECT_ERROR(text, want) expect_error(__LINE__, text, want)

static struct config *expect_ok(int line, const char *text)
{
    struct config_errors e;
    struct config *c = load(text, &e);
    if (!c) {
        t_failed++;
        fprintf(stderr, "%s:%d: config did not load:\n", __FILE__, line);
        dump(&e);
    } else {
        t_passed++;
    }
    config_errors_free(&e);
    return c;
}
#define EXPECT_OK(text) expect_ok(__LINE__, text)

#define LISTEN "'listeners': [{'address': '127.0.0.1:8080'}]"
#define UPS "'upstreams': {'app': {'endpoints': ['127.0.0.1:8000']}}"
#define RESPOND_ROUTE "{'path': '/', 'respond': {'status': 200}}"

static void test_defaults(void)
{
    struct config *c = EXPECT_OK("{" LISTEN ", 'routes': [" RESPOND_ROUTE "]}");
    if (!c)
        return;
    CHECK_EQ_INT(c->refcount, 1);
    CHECK(c->workers >= 1);
    CHECK(strcmp(c->log_level, "info") == 0);
    CHECK_EQ_INT(c->nlisteners, 1);
    CHECK(strcmp(c->listeners[0].address, "127.0.0.1:8080") == 0);
    CHECK_EQ_INT(c->listeners[0].backlog, 511);
    CHECK_EQ_INT(c->listeners[0].addr.ss_family, AF_INET);
    CHECK_EQ_INT(c->limits.max_header_bytes, 16384);
    CHECK_EQ_INT(c->limits.max_headers, 100);
    CHECK_EQ_INT(c->limits.max_uri_bytes, 8192);
    CHECK_EQ_INT(c->limits.max_body_bytes, 10485760);
    CHECK_EQ_INT(c->limits.header_timeout_ms, 10000);
    CHECK_EQ_INT(c->limits.body_timeout_ms, 30000);
    CHECK_EQ_INT(c->limits.body_min_rate, 1024);
    CHECK_EQ_INT(c->limits.idle_timeout_ms, 60000);
    CHECK_EQ_INT(c->limits.send_timeout_ms, 60000);
    CHECK_EQ_INT(c->limits.max_connections, 10000);
    CHECK_EQ_INT(c->limits.drain_timeout_ms, 30000);
    CHECK(strcmp(c->access_log.path, "-") == 0);
    CHECK_EQ_INT(c->ntrusted_proxies, 0);
    CHECK_EQ_INT(c->via, 0);
    CHECK_EQ_INT(c->nupstreams, 0);
    CHECK_EQ_INT(c->nroutes, 1);
    struct config_route *r = c->routes[0];
    CHECK(strcmp(r->name, "routes[0]") == 0);
    CHECK(r->host == NULL);
    CHECK_STR(r->path, r->path_len, "/");
    CHECK_EQ_INT(r->exact, 0);
    CHECK_EQ_INT(r->methods, 0);
    CHECK_EQ_INT(r->respond_status, 200);
    CHECK_STR(r->respond_body, r->respond_body_len, "");
    CHECK(strcmp(r->respond_content_type, "text/plain; charset=utf-8") == 0);
    CHECK(r->upstream == NULL);
    CHECK(c->router != NULL);
    CHECK(c->json != NULL);
    CHECK(config_ref(c) == c);
    CHECK_EQ_INT(c->refcount, 2);
    config_unref(c);
    CHECK_EQ_INT(c->refcount, 1);
    config_unref(c);
}

static void test_full(void)
{
    struct config *c = EXPECT_OK(
        "{'workers': 3, 'busy_poll_us': 50, 'log_level': 'debug', 'via': true,"
        " 'listeners': [{'address': '*:8080', 'backlog': 1024}, {'address': '[::1]:8443'}],"
        " 'limits': {'max_header_bytes': 32768, 'max_headers': 50, 'max_uri_bytes': 4096,"
        "   'max_body_bytes': 0, 'header_timeout_ms': 5000, 'body_timeout_ms': 6000,"
        "   'body_min_rate': 0, 'idle_timeout_ms': 7000, 'send_timeout_ms': 8000,"
        "   'max_connections': 500, 'drain_timeout_ms': 9000},"
        " 'access_log': {'path': '/var/log/portico/access.log', 'format': 'json'},"
        " 'trusted_proxies': ['10.0.0.0/8', '::1'],"
        " 'upstreams': {'users': {'endpoints': ['127.0.0.1:8001', '[::1]:8002'],"
        "     'balance': 'round_robin', 'connect_timeout_ms': 200, 'timeout_ms': 15000,"
        "     'keepalive': 0, 'keepalive_timeout_ms': 1000, 'keepalive_requests': 7},"
        "   'orders.v2': {'endpoints': ['10.1.2.3:9000']}},"
        " 'routes': ["
        "   {'name': 'users', 'host': 'API.Example.com', 'path': '/api/users/', 'upstream': 'users',"
        "    'strip_prefix': '/api', 'methods': ['GET', 'POST', 'PURGE'], 'filters': []},"
        "   {'host': '*.example.com', 'path': '/orders', 'exact': true, 'upstream': 'orders.v2',"
        "    'prefix_rewrite': '/v2/orders'},"
        "   {'path': '/', 'respond': {'status': 404, 'body': 'nothing here\\n',"
        "    'content_type': 'text/html'}}]}");
    if (!c)
        return;
    CHECK_EQ_INT(c->workers, 3);
    CHECK_EQ_INT(c->busy_poll_us, 50);
    CHECK(strcmp(c->log_level, "debug") == 0);
    CHECK_EQ_INT(c->via, 1);
    CHECK_EQ_INT(c->nlisteners, 2);
    const struct sockaddr_in *sin = (const struct sockaddr_in *)&c->listeners[0].addr;
    CHECK_EQ_INT(sin->sin_addr.s_addr, htonl(INADDR_ANY));
    CHECK_EQ_INT(ntohs(sin->sin_port), 8080);
    CHECK_EQ_INT(c->listeners[0].backlog, 1024);
    CHECK_EQ_INT(c->listeners[1].addr.ss_family, AF_INET6);
    CHECK_EQ_INT(c->listeners[1].addrlen, sizeof(struct sockaddr_in6));
    CHECK_EQ_INT(c->limits.max_header_bytes, 32768);
    CHECK_EQ_INT(c->limits.max_headers, 50);
    CHECK_EQ_INT(c->limits.max_uri_bytes, 4096);
    CHECK_EQ_INT(c->limits.max_body_bytes, 0);
    CHECK_EQ_INT(c->limits.header_timeout_ms, 5000);
    CHECK_EQ_INT(c->limits.body_timeout_ms, 6000);
    CHECK_EQ_INT(c->limits.body_min_rate, 0);
    CHECK_EQ_INT(c->limits.idle_timeout_ms, 7000);
    CHECK_EQ_INT(c->limits.send_timeout_ms, 8000);
    CHECK_EQ_INT(c->limits.max_connections, 500);
    CHECK_EQ_INT(c->limits.drain_timeout_ms, 9000);
    CHECK(strcmp(c->access_log.path, "/var/log/portico/access.log") == 0);
    CHECK_EQ_INT(c->ntrusted_proxies, 2);
    CHECK_EQ_INT(c->trusted_proxies[0].prefix, 8);
    CHECK_EQ_INT(c->trusted_proxies[1].prefix, 128);
    CHECK_EQ_INT(c->nupstreams, 2);
    struct config_upstream *u = config_find_upstream(c, "users");
    CHECK(u == &c->upstreams[0]);
    if (u) {
        CHECK_EQ_INT(u->index, 0);
        CHECK_EQ_INT(u->nendpoints, 2);
        CHECK(strcmp(u->endpoints[1].address, "[::1]:8002") == 0);
        CHECK_EQ_INT(u->endpoints[1].addr.ss_family, AF_INET6);
        CHECK_EQ_INT(u->connect_timeout_ms, 200);
        CHECK_EQ_INT(u->timeout_ms, 15000);
        CHECK_EQ_INT(u->keepalive, 0);
        CHECK_EQ_INT(u->keepalive_timeout_ms, 1000);
        CHECK_EQ_INT(u->keepalive_requests, 7);
    }
    u = config_find_upstream(c, "orders.v2");
    CHECK(u && u->index == 1 && u->connect_timeout_ms == 1000 && u->timeout_ms == 60000 &&
          u->keepalive == 64 && u->keepalive_timeout_ms == 30000 && u->keepalive_requests == 10000);
    CHECK(config_find_upstream(c, "nope") == NULL);

    struct config_route *r = c->routes[0];
    CHECK(strcmp(r->name, "users") == 0);
    CHECK(strcmp(r->host, "api.example.com") == 0);
    CHECK_EQ_INT(r->host_wildcard, 0);
    CHECK(r->upstream == config_find_upstream(c, "users"));
    CHECK(strcmp(r->strip_prefix, "/api") == 0);
    /* GET brings HEAD with it */
    CHECK_EQ_INT(r->methods, ROUTE_METHOD_BIT(HTTP_M_GET) | ROUTE_METHOD_BIT(HTTP_M_HEAD) |
                                 ROUTE_METHOD_BIT(HTTP_M_POST));
    CHECK_EQ_INT(r->nother_methods, 1);
    CHECK(r->nother_methods == 1 && strcmp(r->other_methods[0], "PURGE") == 0);
    r = c->routes[1];
    CHECK(strcmp(r->name, "routes[1]") == 0);
    CHECK(strcmp(r->host, "*.example.com") == 0);
    CHECK_EQ_INT(r->host_wildcard, 1);
    CHECK_EQ_INT(r->exact, 1);
    CHECK(strcmp(r->prefix_rewrite, "/v2/orders") == 0);
    CHECK(r->strip_prefix == NULL);
    r = c->routes[2];
    CHECK_EQ_INT(r->respond_status, 404);
    CHECK_STR(r->respond_body, r->respond_body_len, "nothing here\n");
    CHECK(strcmp(r->respond_content_type, "text/html") == 0);

    /* The router built from this config routes requests as configured. */
    const struct config_route *out = NULL;
    struct http_str get = { "GET", 3 };
    CHECK_EQ_INT(router_match(c->router, "api.example.com", 15, "/api/users/7", 12, HTTP_M_GET,
                              &get, &out), ROUTER_MATCH);
    CHECK(out == c->routes[0]);
    CHECK_EQ_INT(router_match(c->router, "x.example.com", 13, "/orders", 7, HTTP_M_GET, &get, &out),
                 ROUTER_MATCH);
    CHECK(out == c->routes[1]);
    CHECK_EQ_INT(router_match(c->router, "other", 5, "/orders", 7, HTTP_M_GET, &get, &out),
                 ROUTER_MATCH);
    CHECK(out == c->routes[2]);
    config_unref(c);
}

static void test_workers_auto(void)
{
    struct config *c = EXPECT_OK("{'workers': 0, " LISTEN ", 'routes': [" RESPOND_ROUTE "]}");
    if (c) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof(set), &set) == 0)
            n = CPU_COUNT(&set);
        CHECK(c->workers >= 1);
        CHECK(c->workers <= (n > 256 ? 256 : n));
        CHECK_EQ_INT(c->busy_poll_us, 0); /* off unless asked for */
    }
    config_unref(c);
    CHECK_EQ_INT(config_cpu_quota("max 100000\n"), 0);
    CHECK_EQ_INT(config_cpu_quota("200000 100000\n"), 2);
    CHECK_EQ_INT(config_cpu_quota("150000 100000"), 2); /* 1.5 CPUs: round up */
    CHECK_EQ_INT(config_cpu_quota("50000 100000"), 1);
    CHECK_EQ_INT(config_cpu_quota("garbage"), 0);
    CHECK_EQ_INT(config_cpu_quota("0 100000"), 0);
}

static void test_unknown_keys(void)
{
    EXPECT_ERROR("{'listenerz': [], " LISTEN ", 'routes': [" RESPOND_ROUTE "]}",
                 "listenerz: unknown key (did you mean \"listeners\"?)");
    EXPECT_ERROR("{'listeners': [{'address': '127.0.0.1:1', 'port': 2}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].port: unknown key");
    EXPECT_ERROR("{" LISTEN ", 'limits': {'max_header': 1}, 'routes': [" RESPOND_ROUTE "]}",
                 "limits.max_header: unknown key (did you mean \"max_headers\"?)");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200}, 'hots': 'a'}]}",
                 "routes[0].hots: unknown key (did you mean \"host\"?)");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'headers': {}}}]}",
                 "routes[0].respond.headers: unknown key");
    EXPECT_ERROR("{" LISTEN ", 'access_log': {'file': 'x'}, 'routes': [" RESPOND_ROUTE "]}",
                 "access_log.file: unknown key");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'weight': 1}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.weight: unknown key");
    /* A key no printable path can hold is quoted. */
    EXPECT_ERROR("{" LISTEN ", 'a b\\n': 1, 'routes': [" RESPOND_ROUTE "]}",
                 "[\"a b\\u000a\"]: unknown key");
}

static void test_admin(void)
{
    struct config_errors e;
    struct config *c = load("{" LISTEN ", 'admin': {}, 'routes': [" RESPOND_ROUTE "]}", &e);
    CHECK(c && c->admin.enabled && strcmp(c->admin.address, "127.0.0.1:9901") == 0 && !c->admin.token);
    config_unref(c);
    c = load("{" LISTEN ", 'routes': [" RESPOND_ROUTE "]}", &e);
    CHECK(c && !c->admin.enabled);
    config_unref(c);
    EXPECT_ERROR("{" LISTEN ", 'admin': {'address': '0.0.0.0:9901'}, 'routes': [" RESPOND_ROUTE "]}",
                 "admin.address: an admin listener on a non-loopback address needs \"token\"");
    EXPECT_ERROR("{" LISTEN ", 'admin': {'address': '*:9901'}, 'routes': [" RESPOND_ROUTE "]}",
                 "needs \"token\"");
    EXPECT_ERROR("{" LISTEN ", 'admin': {'address': 'localhost:9901'}, 'routes': [" RESPOND_ROUTE "]}",
                 "admin.address:");
    EXPECT_ERROR("{" LISTEN ", 'admin': {'token': ''}, 'routes': [" RESPOND_ROUTE "]}",
                 "admin.token: must not be empty");
    EXPECT_ERROR("{" LISTEN ", 'admin': {'address': '127.0.0.1:8080'}, 'routes': [" RESPOND_ROUTE "]}",
                 "admin.address: the same address as listeners[0]");
    c = load("{" LISTEN ", 'admin': {'address': '0.0.0.0:9901', 'token': 's3cret'},"
             " 'routes': [" RESPOND_ROUTE "]}", &e);
    CHECK(c && strcmp(c->admin.token, "s3cret") == 0);
    /* /config shows no secret */
    char *shown = c ? json_dumps(c->json_redacted, 0) : NULL;
    CHECK(shown && !strstr(shown, "s3cret") && strstr(shown, "<redacted>"));
    free(shown);
    config_unref(c);
}

static void test_not_yet(void)
{
    /* Sections owned by modules: refused by name when the module is not
     * built in (the modules' own tests cover them when it is). */
    if (!modules_find("rate_limit"))
        EXPECT_ERROR("{" LISTEN ", 'redis': {}, 'routes': [" RESPOND_ROUTE "]}",
                     "redis: needs the rate_limit module, which is not built into this binary");
    if (!modules_find("jwt_auth"))
        EXPECT_ERROR("{" LISTEN ", 'jwt_providers': {}, 'routes': [" RESPOND_ROUTE "]}",
                     "jwt_providers: needs the jwt_auth module, which is not built into this binary");
    /* TLS blocks: what can be told without certificate files (the e2e
     * tests check real certificates with portico -t). */
    EXPECT_ERROR(
        "{'listeners': [{'address': '127.0.0.1:8443', 'tls': {}}], 'routes': [" RESPOND_ROUTE "]}",
        "listeners[0].tls.certificates: required");
    EXPECT_ERROR("{'listeners': [{'address': '127.0.0.1:8443', 'tls': {'certificates': [{'cert': "
                 "'a', 'key': 'b'}],"
                 " 'min_version': 'SSLv3'}}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].tls.min_version: \"SSLv3\" is not one of");
    EXPECT_ERROR("{'listeners': [{'address': '127.0.0.1:8443', 'tls': {'certificates': [{'cert': "
                 "'/nonexistent/a.crt',"
                 " 'key': '/nonexistent/a.key'}]}}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].tls.certificates[0].cert: cannot open certificate "
                 "/nonexistent/a.crt: No such file");
    EXPECT_ERROR(
        "{'listeners': [{'address': '127.0.0.1:8443', 'tls': {'certificates': [{'cert': '/x'}]}}],"
        " 'routes': [" RESPOND_ROUTE "]}",
        "listeners[0].tls.certificates[0].key: required");
    EXPECT_ERROR("{'listeners': [{'address': '127.0.0.1:8443', 'tls': {'certificates': [],"
                 " 'ciphers': 'NOPE-CIPHER'}}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].tls.certificates: must not be empty");
    EXPECT_ERROR("{'listeners': [{'address': '127.0.0.1:8443', 'tls': {'certificates': [{'cert': "
                 "'a', 'key': 'b'}],"
                 " 'verify': 'optional'}}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].tls.verify: needs \"client_ca\"");
    EXPECT_ERROR("{'listeners': [{'address': '127.0.0.1:8443', 'redirect_to_https': 1}], 'routes': "
                 "[" RESPOND_ROUTE "]}",
                 "listeners[0].redirect_to_https: expected true, false or {\"port\": 8443}");
    EXPECT_ERROR("{" LISTEN
                 ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'tls': {'cert': '/x'}}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.tls: \"cert\" and \"key\" go together");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'tls': {'ca': "
                            "'/nonexistent/ca.pem'}}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.tls.ca: cannot open CA bundle /nonexistent/ca.pem");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'retry': {'on': "
                            "['reset', 'sometimes']}}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.retry.on[1]: expected \"connect_failure\", \"reset\", \"timeout\" or "
                 "a status like \"503\", got \"sometimes\"");
    EXPECT_ERROR("{" LISTEN
                 ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'retry': {'attempts': 0}}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.retry.attempts: must be from 1 to 10, got 0");
    EXPECT_ERROR(
        "{" LISTEN
        ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'circuit_breaker': {'open': 5}}},"
        " 'routes': [" RESPOND_ROUTE "]}",
        "upstreams.a.circuit_breaker.open: unknown key");
    EXPECT_ERROR(
        "{" LISTEN
        ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'health_check': {'path': 'healthz'}}},"
        " 'routes': [" RESPOND_ROUTE "]}",
        "upstreams.a.health_check.path: expected a path like \"/healthz\"");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'health_check': "
                            "{'expected_statuses': ['2yy']}}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.health_check.expected_statuses[0]: expected a status code like "
                 "\"503\" or a class like \"5xx\", got \"2yy\"");
    EXPECT_ERROR("{" LISTEN
                 ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'balance': 'least_conn'}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.balance: expected \"round_robin\", \"least_request\", \"random\" or "
                 "\"hash\", got \"least_conn\"");
    EXPECT_ERROR("{" LISTEN
                 ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'hash_on': 'header:X'}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.hash_on: only with \"balance\": \"hash\"");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1'], 'balance': "
                            "'hash', 'hash_on': 'body'}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.hash_on: expected \"header:NAME\", \"cookie:NAME\" or "
                 "\"client_address\", got \"body\"");
    EXPECT_ERROR("{" LISTEN
                 ", 'upstreams': {'a': {'endpoints': [{'address': '127.0.0.1:1', 'weight': 0}]}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.endpoints[0].weight: must be from 1 to 100, got 0");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'a': {'endpoints': [{'weight': 2}]}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.a.endpoints[0]: an endpoint object needs \"address\"");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200}, 'websocket': true}]}",
                 "routes[0].websocket: only for routes with \"upstream\"");
    EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/', 'upstream': 'app',"
                 " 'websocket_idle_timeout_ms': 5000}]}",
                 "routes[0].websocket_idle_timeout_ms: only with \"websocket\": true");
    EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/', 'upstream': 'app',"
                 " 'websocket': true, 'websocket_idle_timeout_ms': 0}]}",
                 "routes[0].websocket_idle_timeout_ms: must be from 1 to");
    EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/', 'upstream': 'app',"
                 " 'websocket': 'yes'}]}",
                 "routes[0].websocket: expected true or false");
    if (!modules_find("jwt_auth"))
        EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/', 'upstream': 'app',"
                     " 'filters': [{'request_id': {}}, {'jwt_auth': {'providers': ['main']}}]}]}",
                     "routes[0].filters[1]: module \"jwt_auth\" is not built into this binary");
    else
        EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/', 'upstream': 'app',"
                     " 'filters': [{'request_id': {}}, {'jwt_auth': {'providers': ['main']}}]}]}",
                     "routes[0].filters[1].jwt_auth.providers[0]: no provider named \"main\"");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200}, 'filters': ['cors']}]}",
                 "routes[0].filters[0]: expected an object");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200}, 'filters': [{'a': {}, 'b': {}}]}]}",
                 "routes[0].filters[0]: must have exactly one key");
}

static void test_types_and_ranges(void)
{
    EXPECT_ERROR("{" LISTEN ", 'limits': {'max_headers': 'many'}, 'routes': [" RESPOND_ROUTE "]}",
                 "limits.max_headers: expected an integer, got string");
    EXPECT_ERROR("{" LISTEN ", 'limits': {'max_headers': 1.5}, 'routes': [" RESPOND_ROUTE "]}",
                 "limits.max_headers: expected an integer, got number with a fraction");
    EXPECT_ERROR("{" LISTEN ", 'limits': {'max_headers': 1001}, 'routes': [" RESPOND_ROUTE "]}",
                 "limits.max_headers: must be from 1 to 1000, got 1001");
    EXPECT_ERROR("{" LISTEN ", 'limits': {'max_header_bytes': 1000}, 'routes': [" RESPOND_ROUTE "]}",
                 "limits.max_header_bytes: must be from 1024 to 1048576, got 1000");
    EXPECT_ERROR("{" LISTEN ", 'limits': {'max_header_bytes': 2048, 'max_uri_bytes': 4096}, 'routes': [" RESPOND_ROUTE "]}",
                 "limits.max_uri_bytes: must not exceed max_header_bytes (2048)");
    EXPECT_ERROR("{" LISTEN ", 'limits': {'idle_timeout_ms': 0}, 'routes': [" RESPOND_ROUTE "]}",
                 "limits.idle_timeout_ms: must be from 1 to 86400000");
    EXPECT_ERROR("{" LISTEN ", 'limits': {'drain_timeout_ms': 86400001}, 'routes': [" RESPOND_ROUTE "]}",
                 "limits.drain_timeout_ms: must be from 1 to 86400000");
    EXPECT_ERROR("{" LISTEN ", 'limits': {'max_body_bytes': -1}, 'routes': [" RESPOND_ROUTE "]}",
                 "limits.max_body_bytes: must be at least 0, got -1");
    EXPECT_ERROR("{" LISTEN ", 'limits': [], 'routes': [" RESPOND_ROUTE "]}",
                 "limits: expected an object, got array");
    EXPECT_ERROR("{'workers': 257, " LISTEN ", 'routes': [" RESPOND_ROUTE "]}",
                 "workers: must be from 0 to 256, got 257");
    EXPECT_ERROR("{'workers': '2', " LISTEN ", 'routes': [" RESPOND_ROUTE "]}",
                 "workers: expected an integer, got string");
    EXPECT_ERROR("{'busy_poll_us': 1001, " LISTEN ", 'routes': [" RESPOND_ROUTE "]}",
                 "busy_poll_us: must be from 0 to 1000, got 1001");
    EXPECT_ERROR("{'busy_poll_us': -1, " LISTEN ", 'routes': [" RESPOND_ROUTE "]}",
                 "busy_poll_us: must be from 0 to 1000, got -1");
    EXPECT_ERROR("{'busy_poll_us': true, " LISTEN ", 'routes': [" RESPOND_ROUTE "]}",
                 "busy_poll_us: expected an integer, got");
    EXPECT_ERROR("{'log_level': 'verbose', " LISTEN ", 'routes': [" RESPOND_ROUTE "]}",
                 "log_level: \"verbose\" is not one of");
    EXPECT_ERROR("{'via': 1, " LISTEN ", 'routes': [" RESPOND_ROUTE "]}",
                 "via: expected true or false, got integer");
    EXPECT_ERROR("{" LISTEN ", 'access_log': {'format': 'combined'}, 'routes': [" RESPOND_ROUTE "]}",
                 "access_log.format: \"combined\": must be \"json\" or \"text\"");
    EXPECT_ERROR("{'listeners': [{'address': '127.0.0.1:1', 'backlog': 0}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].backlog: must be from 1 to 65535, got 0");
    EXPECT_ERROR("[1, 2]", "the configuration must be a JSON object, got array");
    EXPECT_ERROR("{'routes': [" RESPOND_ROUTE "]}", "listeners: required");
    EXPECT_ERROR("{" LISTEN "}", "routes: required");
    EXPECT_ERROR("{'listeners': [], 'routes': [" RESPOND_ROUTE "]}", "listeners: must not be empty");
    EXPECT_ERROR("{" LISTEN ", 'routes': []}", "routes: must not be empty");
    EXPECT_ERROR("{" LISTEN ", 'routes': {}}", "routes: expected an array, got object");
    EXPECT_ERROR("{" LISTEN ", 'routes': [7]}", "routes[0]: expected an object");
}

static void test_addresses(void)
{
    EXPECT_ERROR("{'listeners': [{'address': 'localhost:8080'}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].address: \"localhost:8080\": not an IP address (host names are not supported here)");
    EXPECT_ERROR("{'listeners': [{'address': '127.0.0.1'}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].address: \"127.0.0.1\": missing port");
    EXPECT_ERROR("{'listeners': [{'address': '127.0.0.1:0'}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].address: \"127.0.0.1:0\": the port must be a number from 1 to 65535");
    EXPECT_ERROR("{'listeners': [{'backlog': 5}], 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[0].address: required");
    EXPECT_ERROR("{'listeners': [{'address': '*:80'}, {'address': '[::1]:80'}, {'address': '0.0.0.0:80'}],"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "listeners[2].address: the same address as listeners[0]");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'orders': {'endpoints': ['orders internal:8000']}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.orders.endpoints[0]: \"orders internal:8000\": expected \"host:port\" "
                 "or \"IP:port\"");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'orders': {'endpoints': ['orders.internal:8000'], "
                            "'dns': {'max_addresses': 0}}},"
                 " 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.orders.dns.max_addresses: must be from 1 to 64, got 0");
    {
        /* A host name endpoint becomes dns.max_addresses slots. */
        struct config *hc =
            EXPECT_OK("{" LISTEN ", 'upstreams': {'orders': {'endpoints':"
                      " ['10.0.0.1:80', {'address': 'orders.internal:8000', 'weight': 2}],"
                      " 'dns': {'max_addresses': 3}}}, 'routes': [" RESPOND_ROUTE "]}");
        if (hc) {
            CHECK_EQ_INT(hc->upstreams[0].nendpoints, 4);
            CHECK(strcmp(hc->upstreams[0].endpoints[2].address, "orders.internal:8000#1") == 0);
            CHECK_EQ_INT(hc->upstreams[0].endpoints[3].dns_port, 8000);
            CHECK_EQ_INT(hc->upstreams[0].resil->weights[3], 2);
            CHECK_EQ_INT(hc->upstreams[0].resil->weights[0], 1);
        }
        config_unref(hc);
    }
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'o': {'endpoints': ['*:8000']}}, 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.o.endpoints[0]: \"*\" (any address) cannot be an endpoint");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'o': {'endpoints': []}}, 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.o.endpoints: must not be empty");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'o': {}}, 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams.o.endpoints: required");
    EXPECT_ERROR("{" LISTEN ", 'upstreams': {'a b': {'endpoints': ['127.0.0.1:1']}}, 'routes': [" RESPOND_ROUTE "]}",
                 "upstreams[\"a b\"]: invalid upstream name");
    EXPECT_ERROR("{" LISTEN ", 'trusted_proxies': ['10.0.0.0/33'], 'routes': [" RESPOND_ROUTE "]}",
                 "trusted_proxies[0]: \"10.0.0.0/33\": the prefix length must be 0..32 for IPv4");
}

static void test_routes(void)
{
    EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/'}, {'path': '/x', 'upstream': 'app'},"
                 " {'path': '/users/', 'upstream': 'userz'}]}",
                 "routes[2].upstream: no upstream named \"userz\"");
    EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/', 'upstream': 'app', 'respond': {'status': 200}}]}",
                 "routes[0]: has both \"upstream\" and \"respond\"");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/'}]}",
                 "routes[0]: needs either \"upstream\"");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'respond': {'status': 200}}]}", "routes[0].path: required");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': 'api', 'respond': {'status': 200}}]}",
                 "routes[0].path: must start with '/'");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/a?b', 'respond': {'status': 200}}]}",
                 "routes[0].path: must not contain '?'");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/a b', 'respond': {'status': 200}}]}",
                 "routes[0].path: contains a byte that cannot appear in a request path");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/a/../b', 'respond': {'status': 200}}]}",
                 "routes[0].path: is not a normalised path");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/a/../b', 'respond': {'status': 200}}]}",
                 "write \"/b\"");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '//api/', 'respond': {'status': 200}}]}",
                 "routes[0].path: is not a normalised path");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/%2e/x', 'respond': {'status': 200}}]}",
                 "routes[0].path: is not a normalised path");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/a/./b', 'respond': {'status': 200}}]}",
                 "routes[0].path: is not a normalised path");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/%c3%a9', 'respond': {'status': 200}}]}",
                 "write \"/%C3%A9\"");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/..', 'respond': {'status': 200}}]}",
                 "routes[0].path: is not a valid path");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/a%2Fb', 'respond': {'status': 200}}]}",
                 "routes[0].path: is not a valid path");
    EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/api/users/', 'upstream': 'app', 'strip_prefix': '/v1'}]}",
                 "routes[0].strip_prefix: must be a prefix of the route's \"path\"");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/api/', 'respond': {'status': 200}, 'strip_prefix': '/api'}]}",
                 "routes[0].strip_prefix: only for routes with \"upstream\"");
    EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/api/', 'upstream': 'app', 'strip_prefix': '/api',"
                 " 'prefix_rewrite': '/v2'}]}",
                 "routes[0].prefix_rewrite: cannot be used together with \"strip_prefix\"");
    EXPECT_ERROR("{" LISTEN ", " UPS ", 'routes': [{'path': '/api/', 'upstream': 'app', 'prefix_rewrite': 'v2'}]}",
                 "routes[0].prefix_rewrite: must start with '/'");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'host': 'api.example.com:8080', 'path': '/', 'respond': {'status': 200}}]}",
                 "routes[0].host: \"api.example.com:8080\": must not include a port");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'host': 'a..b', 'path': '/', 'respond': {'status': 200}}]}",
                 "routes[0].host: \"a..b\" is not a host name");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'host': 'a.*.com', 'path': '/', 'respond': {'status': 200}}]}",
                 "routes[0].host: \"a.*.com\" is not a host name");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'host': '*', 'path': '/', 'respond': {'status': 200}}]}",
                 "routes[0].host: \"*\" alone is not a pattern");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'methods': ['GET', 'get'], 'respond': {'status': 200}}]}",
                 "routes[0].methods[1]: \"get\": methods are case-sensitive");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'methods': ['GE T'], 'respond': {'status': 200}}]}",
                 "routes[0].methods[0]: \"GE T\" is not a valid method name");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'methods': ['GET', 'GET'], 'respond': {'status': 200}}]}",
                 "routes[0].methods[1]: \"GET\" is listed twice");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'methods': [], 'respond': {'status': 200}}]}",
                 "routes[0].methods: must not be empty");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {}}]}",
                 "routes[0].respond.status: required");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 100}}]}",
                 "routes[0].respond.status: must be from 200 to 599, got 100");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 204, 'body': 'x'}}]}",
                 "routes[0].respond.body: a 204 response cannot have a body");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'content_type': 'a\\r\\nX: y'}}]}",
                 "routes[0].respond.content_type: must be a non-empty header value");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': 'ok'}]}",
                 "routes[0].respond: expected an object");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'name': 'a', 'path': '/', 'respond': {'status': 200}},"
                 " {'name': 'a', 'path': '/b', 'respond': {'status': 200}}]}",
                 "routes[1].name: another route has the same name (routes[0])");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'exact': 'yes', 'respond': {'status': 200}}]}",
                 "routes[0].exact: expected true or false, got string");
    /* Two routes the router cannot tell apart. */
    EXPECT_ERROR("{" LISTEN ", 'routes': [" RESPOND_ROUTE ", " RESPOND_ROUTE "]}", "routes: ");
}

static void test_parse_errors(void)
{
    EXPECT_ERROR("{'listeners': [\n{'address': '127.0.0.1:1'},\n]}", "line 3, column 1:");
    EXPECT_ERROR("{'a': 1,\n 'a': 2}", "line 2");
    EXPECT_ERROR("{'a': 1,\n 'a': 2}", "duplicate");
    EXPECT_ERROR("{} x", "line 1");
    EXPECT_ERROR("", "line 1");
}

/* Semantic errors carry the line of their key, or of the nearest
 * ancestor that is in the text. */
static void test_lines(void)
{
    struct config_errors e;
    struct config *c = load("{\n"
                            "  'listeners': [\n"
                            "    {'address': 'nowhere:80'}\n"
                            "  ],\n"
                            "  'limits': {\n"
                            "    'max_headers': 0\n"
                            "  },\n"
                            "  'routes': [\n"
                            "    {'path': '/'},\n"
                            "    {\n"
                            "      'path': '/x',\n"
                            "      'respond': {'body': 'x'}\n"
                            "    }\n"
                            "  ]\n"
                            "}\n", &e);
    CHECK(c == NULL);
    CHECK(has_msg(&e, "listeners[0].address: \"nowhere:80\": not an IP address (host names are not supported here) (line 3)"));
    CHECK(has_msg(&e, "limits.max_headers: must be from 1 to 1000, got 0 (line 6)"));
    CHECK(has_msg(&e, "routes[0]: needs either \"upstream\" (proxy to it) or \"respond\" (answer directly) (line 9)"));
    CHECK(has_msg(&e, "routes[1].respond.status: required (200 to 599) (line 12)"));
    CHECK_EQ_INT(e.n, 4);
    if (e.n != 4)
        dump(&e);
    config_errors_free(&e);
    config_unref(c);
}

/* Everything wrong is reported, not just the first thing. */
static void test_many_errors(void)
{
    struct config_errors e;
    struct config *c = load("{'workers': -1, 'admin': {'tokn': 1}, 'listeners': [{'address': 'x'}],"
                            " 'routes': [{'path': 'a'}, {'path': '/', 'upstream': 'none'}]}", &e);
    CHECK(c == NULL);
    CHECK(has_msg(&e, "workers: must be from 0 to 256, got -1"));
    CHECK(has_msg(&e, "admin.tokn: unknown key"));
    CHECK(has_msg(&e, "listeners[0].address:"));
    CHECK(has_msg(&e, "routes[0].path: must start with '/'"));
    CHECK(has_msg(&e, "routes[0]: needs either"));
    CHECK(has_msg(&e, "routes[1].upstream: no upstream named \"none\""));
    CHECK_EQ_INT(e.n, 6);
    config_errors_free(&e);

    /* A flood of problems is capped, and says so. */
    char *big = malloc(200000), *p = big;
    p += sprintf(p, "{");
    for (int i = 0; i < 500; i++)
        p += sprintf(p, "\"k%d\": 1, ", i);
    sprintf(p, "\"routes\": 1}");
    c = config_load_string(big, NULL, &e);
    CHECK(c == NULL);
    CHECK_EQ_INT(e.n, 101);
    CHECK(e.n && strstr(e.msgs[e.n - 1], "more problems") != NULL);
    free(big);
    config_errors_free(&e);
}

static void test_substitution(void)
{
    struct config_errors e;
    setenv("PT_SECRET", SECRET_MARKER, 1);
    setenv("PT_PORT", "9090", 1);
    setenv("PT_EMPTY", "", 1);
    unsetenv("PT_UNSET");

    struct config *c = EXPECT_OK(
        "{'listeners': [{'address': '127.0.0.1:${PT_PORT}'}],"
        " 'routes': [{'path': '/a', 'respond': {'status': 200, 'body': 'k=${PT_SECRET}.'}},"
        "  {'path': '/b', 'respond': {'status': 200, 'body': '${PT_UNSET:-dflt} ${PT_EMPTY:-e2} [${PT_EMPTY}]'}},"
        "  {'path': '/c', 'respond': {'status': 200, 'body': 'cost $$5, $ alone, $x, end$'}},"
        "  {'path': '/d', 'respond': {'status': 200, 'body': '@@not-a-file ${PT_PORT}'}},"
        "  {'path': '/e', 'respond': {'status': 200, 'body': '${PT_UNSET:-}'}}]}");
    if (c) {
        CHECK(strcmp(c->listeners[0].address, "127.0.0.1:9090") == 0);
        CHECK(strcmp(c->routes[0]->respond_body, "k=" SECRET_MARKER ".") == 0);
        CHECK(strcmp(c->routes[1]->respond_body, "dflt e2 []") == 0);
        CHECK(strcmp(c->routes[2]->respond_body, "cost $5, $ alone, $x, end$") == 0);
        CHECK(strcmp(c->routes[3]->respond_body, "@not-a-file 9090") == 0);
        CHECK(strcmp(c->routes[4]->respond_body, "") == 0);
        /* Keys are not substituted; the document keeps the substituted values. */
        json_t *b = json_object_get(json_object_get(json_array_get(json_object_get(c->json, "routes"), 0),
                                                    "respond"), "body");
        CHECK(b && strcmp(json_string_value(b), "k=" SECRET_MARKER ".") == 0);
    }
    config_unref(c);

    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '${PT_UNSET}'}}]}",
                 "routes[0].respond.body: environment variable \"PT_UNSET\" is not set");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': 'a ${PT_PORT'}}]}",
                 "routes[0].respond.body: unterminated \"${\"");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '${1X}'}}]}",
                 "routes[0].respond.body: \"${\" must be followed by a variable name");
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '${A:b}'}}]}",
                 "routes[0].respond.body: \"${\" must be followed by a variable name");

    setenv("PT_BINARY", "\xff\xfe", 1);
    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '${PT_BINARY}'}}]}",
                 "routes[0].respond.body: the substituted value is not valid UTF-8");
    unsetenv("PT_BINARY");

    /* A failed substitution is reported once, not again as a bad value. */
    c = load("{'listeners': [{'address': '${PT_UNSET}'}], 'routes': [" RESPOND_ROUTE "]}", &e);
    CHECK(c == NULL);
    CHECK_EQ_INT(e.n, 1);
    CHECK(has_msg(&e, "listeners[0].address: environment variable \"PT_UNSET\" is not set (line 1)"));
    config_errors_free(&e);

    /* A secret never appears in a message, even when the value is wrong:
     * the message quotes the template instead. */
    c = load("{'listeners': [{'address': '${PT_SECRET}'}], 'log_level': '${PT_SECRET}',"
             " 'upstreams': {'u': {'endpoints': ['x${PT_SECRET}:1'], 'balance': '${PT_SECRET}'}},"
             " 'access_log': {'format': '${PT_SECRET}'}, 'trusted_proxies': ['${PT_SECRET}'],"
             " 'routes': [{'path': '/${PT_SECRET}/../a', 'respond': {'status': 200}},"
             "  {'host': '${PT_SECRET}:1', 'path': '/', 'upstream': '${PT_SECRET}',"
             "   'methods': ['${PT_SECRET}', 'get${PT_SECRET}']},"
             "  {'path': '/q', 'respond': {'status': 200, 'content_type': '${PT_SECRET}\\n'}}]}", &e);
    CHECK(c == NULL);
    CHECK(e.n >= 10);
    CHECK(no_marker(&e));
    CHECK(has_msg(&e, "listeners[0].address: \"${PT_SECRET}\" (after substitution)"));
    CHECK(has_msg(&e, "routes[1].upstream: no upstream named \"${PT_SECRET}\" (after substitution)"));
    CHECK(has_msg(&e, "routes[0].path: is not a normalised path"));
    config_errors_free(&e);
    config_unref(c);
}

static char *write_temp(const char *dir, const char *name, const char *content)
{
    char *path = malloc(strlen(dir) + strlen(name) + 2);
    sprintf(path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f) {
        fputs(content, f);
        fclose(f);
    }
    return path;
}

static void test_secret_files(void)
{
    char dir[] = "/tmp/portico-test-config-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char *secret = write_temp(dir, "secret.txt", SECRET_MARKER "\n");
    char *crlf = write_temp(dir, "crlf.txt", "line1\nline2\r\n");
    char *empty = write_temp(dir, "empty.txt", "");
    char text[4096];
    struct config_errors e;

    snprintf(text, sizeof(text),
             "{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '@%s'}},"
             " {'path': '/2', 'respond': {'status': 200, 'body': '@%s'}},"
             " {'path': '/3', 'respond': {'status': 200, 'body': '@%s'}}]}", secret, crlf, empty);
    struct config *c = EXPECT_OK(text);
    if (c) {
        CHECK(strcmp(c->routes[0]->respond_body, SECRET_MARKER) == 0);
        CHECK(strcmp(c->routes[1]->respond_body, "line1\nline2") == 0);
        CHECK(strcmp(c->routes[2]->respond_body, "") == 0);
    }
    config_unref(c);

    /* A missing file: named, not read. */
    snprintf(text, sizeof(text),
             "{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '@%s/missing.txt'}}]}", dir);
    char want[512];
    snprintf(want, sizeof(want), "routes[0].respond.body: cannot read \"%s/missing.txt\": No such file or directory", dir);
    EXPECT_ERROR(text, want);
    /* A directory is not a secret file. */
    snprintf(text, sizeof(text),
             "{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '@%s'}}]}", dir);
    EXPECT_ERROR(text, "is not a regular file");
    /* Secret files are capped at 1 MiB. */
    char *big = malloc((1 << 20) + 2);
    memset(big, 'x', (1 << 20) + 1);
    big[(1 << 20) + 1] = '\0';
    char *bigpath = write_temp(dir, "big.txt", big);
    snprintf(text, sizeof(text),
             "{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '@%s'}}]}", bigpath);
    EXPECT_ERROR(text, "big.txt\" is larger than 1 MiB");
    big[1 << 20] = '\0';
    free(write_temp(dir, "big.txt", big));
    c = EXPECT_OK(text);
    CHECK(c && c->routes[0]->respond_body_len == 1 << 20);
    config_unref(c);
    unlink(bigpath);
    free(bigpath);
    free(big);

    EXPECT_ERROR("{" LISTEN ", 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '@'}}]}",
                 "routes[0].respond.body: \"@\" must be followed by a file path");

    /* The content of a file used where it is invalid is not shown either. */
    snprintf(text, sizeof(text),
             "{'listeners': [{'address': '@%s'}], 'routes': [" RESPOND_ROUTE "]}", secret);
    EXPECT_ERROR(text, "(after substitution)");

    /* Relative @paths are relative to the config file's directory;
     * relative access log paths too. */
    char *cfg = write_temp(dir, "portico.json", "");
    FILE *f = fopen(cfg, "w");
    if (f) {
        char *body = j("{" LISTEN ", 'access_log': {'path': 'logs/access.log'},"
                       " 'routes': [{'path': '/', 'respond': {'status': 200, 'body': '@secret.txt'}}]}");
        fputs(body, f);
        free(body);
        fclose(f);
    }
    memset(&e, 0, sizeof(e));
    c = config_load(cfg, &e);
    dump(&e);
    CHECK(c != NULL);
    if (c) {
        char logpath[512];
        snprintf(logpath, sizeof(logpath), "%s/logs/access.log", dir);
        CHECK(strcmp(c->routes[0]->respond_body, SECRET_MARKER) == 0);
        CHECK(strcmp(c->access_log.path, logpath) == 0);
        CHECK(strcmp(c->file, cfg) == 0);
    }
    config_unref(c);
    config_errors_free(&e);

    /* config_load on a file that is not there. */
    c = config_load("/nonexistent/portico.json", &e);
    CHECK(c == NULL);
    CHECK(has_msg(&e, "cannot open: No such file or directory"));
    config_errors_free(&e);

    unlink(secret), unlink(crlf), unlink(empty), unlink(cfg);
    rmdir(dir);
    free(secret), free(crlf), free(empty), free(cfg);
}

/* Every shipped config must load. */
static void load_dir(const char *sub)
{
    char dir[1024];
    snprintf(dir, sizeof(dir), "%s/%s", TEST_SRCDIR, sub);
    DIR *d = opendir(dir);
    CHECK(d != NULL);
    if (!d)
        return;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 5, ".json") != 0)
            continue;
        char path[2048];
        snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
        /* An example of a module left out of this build cannot load. */
        if (strcmp(de->d_name, "jwt.json") == 0 && !modules_find("jwt_auth"))
            continue;
        struct config_errors e = { 0 };
        struct config *c = config_load(path, &e);
        /* An example of a module left out of this build is refused by
         * name only: that is the right answer here. */
        size_t absent = 0;
        for (size_t i = 0; i < e.n; i++)
            absent += strstr(e.msgs[i], "not built into this binary") != NULL;
        if (!c && e.n && absent == e.n) {
            config_errors_free(&e);
            n++;
            continue;
        }
        if (!c) {
            fprintf(stderr, "%s does not load:\n", path);
            dump(&e);
        }
        CHECK(c != NULL);
        config_unref(c);
        config_errors_free(&e);
        n++;
    }
    closedir(d);
    CHECK(n >= 1);
}

/* The route that answers a request, by name ("" when none). */
static const char *route_for(const struct config *c, const char *host, const char *method,
                             const char *path)
{
    static const char *const names[] = { "", "GET", "HEAD", "POST", "PUT", "DELETE",
                                         "OPTIONS", "PATCH", "TRACE", "CONNECT" };
    enum http_method m = HTTP_M_OTHER;
    for (int i = 1; i < 10; i++)
        if (strcmp(method, names[i]) == 0)
            m = (enum http_method)i;
    struct http_str ms = { method, strlen(method) };
    const struct config_route *r = NULL;
    if (router_match(c->router, host, strlen(host), path, strlen(path), m, &ms, &r) != ROUTER_MATCH)
        return "";
    return r->name;
}

static struct config *load_example(const char *name)
{
    char path[1024];
    struct config_errors e = { 0 };
    snprintf(path, sizeof(path), "%s/%s", TEST_SRCDIR, name);
    struct config *c = config_load(path, &e);
    dump(&e);
    config_errors_free(&e);
    CHECK(c != NULL);
    return c;
}

static void test_shipped_configs(void)
{
    load_dir("conf");
    load_dir("conf/examples");

    /* What conf/examples/README.md says about routing holds. */
    unsetenv("PORTICO_ACCESS_LOG");
    struct config *c = load_example("conf/examples/production.json");
    if (c) {
        CHECK(strcmp(c->access_log.path, "/var/log/portico/access.log") == 0);
        CHECK(strcmp(route_for(c, "api.example.com", "GET", "/healthz"), "api") == 0);
        CHECK(strcmp(route_for(c, "10.0.0.1", "GET", "/healthz"), "healthz") == 0);
        CHECK(strcmp(route_for(c, "api.example.com", "GET", "/uploads/a"), "api") == 0);
        CHECK(strcmp(route_for(c, "api.example.com", "PUT", "/uploads/a"), "uploads") == 0);
        CHECK(strcmp(route_for(c, "api.example.com", "GET", "/billing/invoices/7"), "billing") == 0);
        CHECK(strcmp(route_for(c, "api.example.com", "PURGE", "/cache/x"), "purge") == 0);
        CHECK(strcmp(route_for(c, "acme.tenants.example.com", "GET", "/"), "tenants") == 0);
        CHECK(strcmp(route_for(c, "tenants.example.com", "GET", "/"), "fallback") == 0);
        CHECK(strcmp(route_for(c, "api.example.com", "GET", "/v1/users"), "legacy-v1") == 0);
    }
    config_unref(c);
    c = load_example("conf/examples/django-fleet.json");
    if (c) {
        CHECK(strcmp(route_for(c, "users.example.com", "GET", "/api/users/"), "users-api") == 0);
        CHECK(strcmp(route_for(c, "orders.example.com", "GET", "/api/orders/1"), "orders-api") == 0);
        CHECK(strcmp(route_for(c, "users.example.com", "GET", "/"), "not-found") == 0);
        CHECK(strcmp(route_for(c, "users.example.com", "GET", "/static/app.css"), "users-static") == 0);
    }
    config_unref(c);
    c = load_example("conf/examples/resilience.json");
    if (c) {
        const struct config_upstream *u = config_find_upstream(c, "users");
        const struct resil_upstream *ru = u->resil;
        CHECK_EQ_INT(ru->balance, BAL_LEAST_REQUEST);
        CHECK_EQ_INT(ru->weights[2], 2);
        CHECK_EQ_INT(ru->nschedule, 4);
        CHECK_EQ_INT(ru->retry.attempts, 2);
        CHECK_EQ_INT(ru->retry.on, RETRY_ON_CONNECT | RETRY_ON_RESET);
        CHECK(resil_status_in(ru->retry.on_status, 503) &&
              !resil_status_in(ru->retry.on_status, 502));
        CHECK_EQ_INT(ru->retry.per_try_timeout_ms, 3000);
        CHECK_EQ_INT(ru->breaker.enabled, 1);
        CHECK_EQ_INT(ru->breaker.max_ejected_percent, 50);
        CHECK(resil_status_in(ru->failure_status, 503) &&
              !resil_status_in(ru->failure_status, 500));
        CHECK_EQ_INT(ru->health.enabled, 1);
        CHECK_EQ_INT(ru->health.unhealthy_threshold, 3);
        CHECK(resil_status_in(ru->health.statuses, 204) &&
              !resil_status_in(ru->health.statuses, 500));
        CHECK_EQ_INT(ru->max_requests, 2000);
        u = config_find_upstream(c, "sessions");
        CHECK_EQ_INT(u->resil->balance, BAL_HASH);
        CHECK_EQ_INT(u->resil->hash_on, HASH_COOKIE);
        CHECK(strcmp(u->resil->hash_name, "session") == 0);
        CHECK_EQ_INT(u->resil->ring.n, 3 * BALANCE_RING_POINTS);
        CHECK_EQ_INT(u->resil->health.enabled, 0);
        u = config_find_upstream(c, "orders");
        CHECK_EQ_INT(u->nendpoints, 8);
        CHECK(u->endpoints[7].dns_host && strcmp(u->endpoints[7].dns_host, "orders.internal") == 0);
        CHECK_EQ_INT(u->resil->retry.non_idempotent, 1);
        CHECK_EQ_INT(u->resil->retry.max_replay_body_bytes, 16384);
        CHECK_EQ_INT(u->resil->retry.on, RETRY_ON_CONNECT | RETRY_ON_RESET | RETRY_ON_TIMEOUT);
        CHECK_EQ_INT(config_find_upstream(c, "users")->resil->retry.budget_percent, 20);
    }
    config_unref(c);
    /* Without the blocks: one try, no breaker, no checks, round robin. */
    c = EXPECT_OK("{" LISTEN ", 'upstreams': {'a': {'endpoints': ['127.0.0.1:1', '127.0.0.1:2']}},"
                  " 'routes': [" RESPOND_ROUTE "]}");
    if (c) {
        const struct resil_upstream *ru = c->upstreams[0].resil;
        CHECK_EQ_INT(ru->retry.attempts, 1);
        CHECK_EQ_INT(ru->breaker.enabled, 0);
        CHECK_EQ_INT(ru->health.enabled, 0);
        CHECK_EQ_INT(ru->balance, BAL_ROUND_ROBIN);
        CHECK_EQ_INT(ru->nschedule, 2);
    }
    config_unref(c);
    c = load_example("conf/portico.json");
    if (c) {
        CHECK(strcmp(c->listeners[0].address, "127.0.0.1:8080") == 0);
        CHECK(strcmp(route_for(c, "localhost", "POST", "/api/things/"), "api") == 0);
        CHECK(strcmp(route_for(c, "localhost", "GET", "/"), "home") == 0);
        CHECK(c->routes[1]->respond_status == 200);
    }
    config_unref(c);
}

static void test_addr(void)
{
    struct sockaddr_storage ss;
    socklen_t len = 0;
    char err[128], out[64];

    CHECK_EQ_INT(addr_parse("10.1.2.3:80", &ss, &len, err, sizeof(err)), 0);
    CHECK_EQ_INT(len, sizeof(struct sockaddr_in));
    addr_format((struct sockaddr *)&ss, out, sizeof(out));
    CHECK(strcmp(out, "10.1.2.3:80") == 0);
    CHECK_EQ_INT(addr_parse("[2001:db8::1]:65535", &ss, &len, err, sizeof(err)), 0);
    CHECK_EQ_INT(len, sizeof(struct sockaddr_in6));
    addr_format((struct sockaddr *)&ss, out, sizeof(out));
    CHECK(strcmp(out, "[2001:db8::1]:65535") == 0);
    addr_format_ip((struct sockaddr *)&ss, out, sizeof(out));
    CHECK(strcmp(out, "2001:db8::1") == 0);
    CHECK_EQ_INT(addr_parse("[::ffff:192.0.2.7]:1", &ss, &len, err, sizeof(err)), 0);
    addr_format_ip((struct sockaddr *)&ss, out, sizeof(out));
    CHECK(strcmp(out, "192.0.2.7") == 0);
    CHECK_EQ_INT(addr_parse("*:8080", &ss, &len, err, sizeof(err)), 0);
    addr_format((struct sockaddr *)&ss, out, sizeof(out));
    CHECK(strcmp(out, "0.0.0.0:8080") == 0);

    static const char *const bad[] = {
        "", "1.2.3.4", "1.2.3.4:", "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:80x", "1.2.3.4:+80",
        ":80", "::1:80", "[::1]", "[::1]80", "[::1:80", "[1.2.3.4]:80", "1.2.3:80", "127.1:80",
        "1.2.3.256:80", "example.com:80", "[fe80::1%eth0]:80", "1.2.3.4:123456",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        int rc = addr_parse(bad[i], &ss, &len, err, sizeof(err));
        if (rc != -1 || !err[0])
            fprintf(stderr, "addr_parse accepted \"%s\"\n", bad[i]);
        CHECK(rc == -1 && err[0]);
    }
    addr_parse("example.com:80", &ss, &len, err, sizeof(err));
    CHECK(strcmp(err, "not an IP address (host names are not supported here)") == 0);
    /* Short output buffers truncate instead of overflowing. */
    addr_parse("[2001:db8::1]:65535", &ss, &len, err, sizeof(err));
    char tiny[8];
    addr_format((struct sockaddr *)&ss, tiny, sizeof(tiny));
    CHECK(strlen(tiny) == 7);
}

static int match_ip(const struct cidr *c, const char *ip)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (strchr(ip, ':')) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        s6->sin6_family = AF_INET6;
        inet_pton(AF_INET6, ip, &s6->sin6_addr);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        s4->sin_family = AF_INET;
        inet_pton(AF_INET, ip, &s4->sin_addr);
    }
    return cidr_match(c, (struct sockaddr *)&ss);
}

static void test_cidr(void)
{
    struct cidr c;
    char err[128];

    CHECK_EQ_INT(cidr_parse("10.1.2.3/8", &c, err, sizeof(err)), 0);
    CHECK_EQ_INT(c.family, AF_INET);
    CHECK_EQ_INT(c.prefix, 8);
    CHECK(c.addr[0] == 10 && c.addr[1] == 0 && c.addr[2] == 0 && c.addr[3] == 0);
    CHECK(match_ip(&c, "10.200.0.1"));
    CHECK(!match_ip(&c, "11.0.0.1"));
    CHECK(match_ip(&c, "::ffff:10.9.9.9"));
    CHECK(!match_ip(&c, "::ffff:11.9.9.9"));
    CHECK(!match_ip(&c, "::10.9.9.9"));

    CHECK_EQ_INT(cidr_parse("192.168.1.0/23", &c, err, sizeof(err)), 0);
    CHECK(c.addr[2] == 0);
    CHECK(match_ip(&c, "192.168.1.77"));
    CHECK(match_ip(&c, "192.168.0.1"));
    CHECK(!match_ip(&c, "192.168.2.1"));

    CHECK_EQ_INT(cidr_parse("203.0.113.9", &c, err, sizeof(err)), 0);
    CHECK_EQ_INT(c.prefix, 32);
    CHECK(match_ip(&c, "203.0.113.9"));
    CHECK(!match_ip(&c, "203.0.113.8"));

    CHECK_EQ_INT(cidr_parse("0.0.0.0/0", &c, err, sizeof(err)), 0);
    CHECK(match_ip(&c, "1.2.3.4"));
    CHECK(match_ip(&c, "::ffff:1.2.3.4"));
    CHECK(!match_ip(&c, "2001:db8::1"));

    CHECK_EQ_INT(cidr_parse("2001:db8:ab::/48", &c, err, sizeof(err)), 0);
    CHECK_EQ_INT(c.family, AF_INET6);
    CHECK(match_ip(&c, "2001:db8:ab:ffff::1"));
    CHECK(!match_ip(&c, "2001:db8:ac::1"));
    CHECK(!match_ip(&c, "10.0.0.1"));

    CHECK_EQ_INT(cidr_parse("2001:db8::ffff/127", &c, err, sizeof(err)), 0);
    CHECK(c.addr[15] == 0xfe);
    CHECK(match_ip(&c, "2001:db8::fffe"));
    CHECK(!match_ip(&c, "2001:db8::fffd"));

    CHECK_EQ_INT(cidr_parse("::1", &c, err, sizeof(err)), 0);
    CHECK_EQ_INT(c.prefix, 128);
    CHECK(match_ip(&c, "::1"));
    CHECK(!match_ip(&c, "127.0.0.1"));

    /* An IPv6 range written over mapped addresses matches IPv4 clients. */
    CHECK_EQ_INT(cidr_parse("::ffff:10.0.0.0/104", &c, err, sizeof(err)), 0);
    CHECK(match_ip(&c, "10.1.1.1"));
    CHECK(!match_ip(&c, "11.1.1.1"));

    static const char *const bad[] = {
        "", "/8", "10.0.0.0/", "10.0.0.0/33", "::/129", "10.0.0.0/a", "10.0.0.0/-1",
        "10.0.0.0/8/8", "example.com/8", "10.0.0/8", "[::1]/128", "10.0.0.0/0008",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        int rc = cidr_parse(bad[i], &c, err, sizeof(err));
        if (rc != -1 || !err[0])
            fprintf(stderr, "cidr_parse accepted \"%s\"\n", bad[i]);
        CHECK(rc == -1 && err[0]);
    }
}

int main(void)
{
    test_addr();
    test_cidr();
    test_defaults();
    test_full();
    test_workers_auto();
    test_unknown_keys();
    test_not_yet();
    test_admin();
    test_types_and_ranges();
    test_addresses();
    test_routes();
    test_parse_errors();
    test_lines();
    test_many_errors();
    test_substitution();
    test_secret_files();
    test_shipped_configs();
    return test_summary();
}
