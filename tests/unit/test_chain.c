/* The filter chain (src/filter.c with src/conn.c), unit-tested with a
 * test-only "trace" module in place of the generated module table, like
 * HAProxy's trace filter: every hook appends "name:hook" to one event list,
 * so order is asserted exactly.
 *
 * A real worker serves a real listening socket on its own thread; a small
 * upstream thread answers "200 ok" and counts the requests it gets; the
 * test thread is the client. Under the ASan build (tests/run-all.sh) the
 * pause-then-disconnect cases also prove nothing is resumed into freed
 * memory and nothing leaks.
 *
 *   { "trace": { "name": "a", "on_request": "continue" | "respond" |
 *                "pause" | "pause_respond", "on_response": "continue" |
 *                "respond", "status": 418, "pause_ms": 20 } } */
#define _GNU_SOURCE /* strcasestr */
#include "testlib.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "metrics.h"
#include "module.h"
#include "modules.h"
#include "worker.h"

/* ---- the event list ----------------------------------------------------- */

#define MAX_EVENTS 64
static pthread_mutex_t ev_lock = PTHREAD_MUTEX_INITIALIZER;
static char events[MAX_EVENTS][32];
static int nevents;

static void record(const char *name, const char *hook)
{
    pthread_mutex_lock(&ev_lock);
    if (nevents < MAX_EVENTS)
        snprintf(events[nevents++], sizeof(events[0]), "%s:%s", name, hook);
    pthread_mutex_unlock(&ev_lock);
}

static void sleep_ms(int ms);

/* Start a case with an empty list, once the previous case's late events
 * (on_log and cleanups run after the client has its answer) are in: no
 * new event for 100 ms. */
static void events_clear(void)
{
    for (int last = -1, waited = 0; waited < 3000; waited += 100) {
        pthread_mutex_lock(&ev_lock);
        int n = nevents;
        pthread_mutex_unlock(&ev_lock);
        if (n == last)
            break;
        last = n;
        sleep_ms(100);
    }
    pthread_mutex_lock(&ev_lock);
    nevents = 0;
    pthread_mutex_unlock(&ev_lock);
}

/* "a:request b:request ..." */
static void events_text(char *out, size_t cap)
{
    size_t n = 0;
    out[0] = 0;
    pthread_mutex_lock(&ev_lock);
    for (int i = 0; i < nevents && n + 1 < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, "%s%s", i ? " " : "", events[i]);
    pthread_mutex_unlock(&ev_lock);
}

static int events_have(const char *ev)
{
    int found = 0;
    pthread_mutex_lock(&ev_lock);
    for (int i = 0; i < nevents && !found; i++)
        found = strcmp(events[i], ev) == 0;
    pthread_mutex_unlock(&ev_lock);
    return found;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* on_log runs once the response is written, which can be just after the
 * client has read it: wait a little for an event to appear. */
static int wait_event(const char *ev, int ms)
{
    for (int waited = 0; waited <= ms; waited += 5) {
        if (events_have(ev))
            return 1;
        sleep_ms(5);
    }
    return 0;
}

/* ---- the trace module --------------------------------------------------- */

enum { T_CONTINUE, T_RESPOND, T_PAUSE, T_PAUSE_RESPOND };

struct trace_conf {
    char name[16];
    int on_request, on_response, status, pause_ms;
};

struct trace_req {
    struct request *r;
    const struct trace_conf *cfg;
    struct event *timer;
};

static int action(const char *s)
{
    static const char *const names[] = { "continue", "respond", "pause", "pause_respond" };
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    return -1;
}

static int trace_parse(json_t *json, const char *path, void *gcfg, void **out, char *err,
                       size_t errlen)
{
    (void)gcfg;
    const char *name = "?", *req = "continue", *resp = "continue";
    int status = 418, pause_ms = 20;
    if (json_unpack(json, "{s?s, s?s, s?s, s?i, s?i !}", "name", &name, "on_request", &req,
                    "on_response", &resp, "status", &status, "pause_ms", &pause_ms) != 0 ||
        action(req) < 0 || action(resp) < 0) {
        snprintf(err, errlen, "%s: bad trace config", path);
        return -1;
    }
    struct trace_conf *c = calloc(1, sizeof(*c));
    snprintf(c->name, sizeof(c->name), "%s", name);
    c->on_request = action(req);
    c->on_response = action(resp);
    c->status = status;
    c->pause_ms = pause_ms;
    *out = c;
    return 0;
}

static void trace_cleanup(void *arg)
{
    struct trace_req *t = arg;
    record(t->cfg->name, "cleanup");
    if (t->timer) {
        event_free(t->timer);
        t->timer = NULL;
    }
}

static void on_trace_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct trace_req *t = arg;
    event_free(t->timer);
    t->timer = NULL;
    record(t->cfg->name, "resumed");
    if (t->cfg->on_request == T_PAUSE_RESPOND)
        request_respond(t->r, t->cfg->status, "text/plain", "paused answer\n", 14);
    else
        request_resume(t->r);
}

static enum filter_status trace_on_request(struct request *r, void *cfgp, void **ctx)
{
    const struct trace_conf *cfg = cfgp;
    struct trace_req *t = request_alloc(r, sizeof(*t));
    t->r = r;
    t->cfg = cfg;
    *ctx = t;
    record(cfg->name, "request");
    switch (cfg->on_request) {
    case T_RESPOND:
        request_respond(r, cfg->status, "text/plain", "trace answer\n", 13);
        return FILTER_RESPONDED;
    case T_PAUSE:
    case T_PAUSE_RESPOND: {
        t->timer = evtimer_new(request_event_base(r), on_trace_timer, t);
        request_cleanup_add(r, trace_cleanup, t);
        struct timeval tv = { cfg->pause_ms / 1000, (cfg->pause_ms % 1000) * 1000 };
        evtimer_add(t->timer, &tv);
        return FILTER_PAUSED;
    }
    }
    return FILTER_CONTINUE;
}

static enum filter_status trace_on_response(struct request *r, void *cfgp, void **ctx)
{
    (void)ctx;
    const struct trace_conf *cfg = cfgp;
    record(cfg->name, "response");
    if (cfg->on_response == T_RESPOND) {
        request_respond(r, cfg->status, "text/plain", "replaced\n", 9);
        return FILTER_RESPONDED;
    }
    return FILTER_CONTINUE;
}

static void trace_on_log(struct request *r, void *cfgp, void **ctx)
{
    (void)r;
    (void)ctx;
    record(((const struct trace_conf *)cfgp)->name, "log");
}

static const struct module module_trace = {
    .name = "trace",
    .parse_config = trace_parse,
    .free_config = free,
    .on_request = trace_on_request,
    .on_response = trace_on_response,
    .on_log = trace_on_log,
};

/* This program's module table, instead of the generated one. */
const struct module *const portico_modules[] = { &module_trace, NULL };

const struct module *modules_find(const char *name)
{
    return strcmp(name, "trace") == 0 ? &module_trace : NULL;
}

/* ---- a real upstream ---------------------------------------------------- */

static int upstream_fd;
static int upstream_requests; /* atomic */

static void *upstream_conn(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char buf[8192];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = 0;
        char *end;
        while ((end = strstr(buf, "\r\n\r\n")) != NULL) {
            __atomic_add_fetch(&upstream_requests, 1, __ATOMIC_SEQ_CST);
            static const char resp[] = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
            if (write(fd, resp, sizeof(resp) - 1) < 0)
                break;
            size_t used = (size_t)(end + 4 - buf);
            memmove(buf, buf + used, have - used);
            have -= used;
            buf[have] = 0;
        }
        if (have == sizeof(buf) - 1)
            break;
    }
    close(fd);
    return NULL;
}

static void *upstream_main(void *arg)
{
    (void)arg;
    for (;;) {
        int fd = accept(upstream_fd, NULL, NULL);
        if (fd < 0)
            return NULL;
        pthread_t t;
        pthread_create(&t, NULL, upstream_conn, (void *)(intptr_t)fd);
        pthread_detach(t);
    }
}

static int listen_any(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(sa);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 64) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
        perror("upstream socket");
        exit(1);
    }
    *port = ntohs(sa.sin_port);
    return fd;
}

/* A port nothing listens on right now, for the gateway's own listener. */
static int free_port(void)
{
    int port, fd = listen_any(&port);
    close(fd);
    return port;
}

/* ---- the client --------------------------------------------------------- */

static int gw_port;

static int client_connect(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET,
                              .sin_port = htons((uint16_t)gw_port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    struct timeval tv = { 5, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    for (int i = 0; i < 200; i++) {
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            return fd;
        sleep_ms(10);
    }
    perror("connect to the gateway");
    exit(1);
}

/* Send a GET and read one whole Content-Length response; returns the
 * status (0 on a broken answer) and copies the body. */
static int client_get(int fd, const char *path, char *body, size_t cap)
{
    char req[256], buf[8192];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path);
    if (write(fd, req, (size_t)n) != n)
        return 0;
    size_t have = 0;
    for (;;) {
        ssize_t k = read(fd, buf + have, sizeof(buf) - 1 - have);
        if (k <= 0)
            return 0;
        have += (size_t)k;
        buf[have] = 0;
        char *end = strstr(buf, "\r\n\r\n");
        if (!end)
            continue;
        char *cl = strcasestr(buf, "\r\nContent-Length:");
        if (!cl || cl > end)
            return 0;
        size_t want = (size_t)(end + 4 - buf) + strtoul(cl + 17, NULL, 10);
        if (have < want)
            continue;
        size_t blen = want - (size_t)(end + 4 - buf);
        if (blen >= cap)
            blen = cap - 1;
        memcpy(body, end + 4, blen);
        body[blen] = 0;
        return atoi(buf + 9);
    }
}

static int get_once(const char *path, char *body, size_t cap)
{
    int fd = client_connect();
    int st = client_get(fd, path, body, cap);
    close(fd);
    return st;
}

#define CHECK_EVENTS(expect)                                                               \
    do {                                                                                   \
        char _got[1024];                                                                   \
        events_text(_got, sizeof(_got));                                                   \
        if (strcmp(_got, (expect)) == 0)                                                   \
            t_passed++;                                                                    \
        else {                                                                             \
            t_failed++;                                                                    \
            fprintf(stderr, "%s:%d: events\n  got      [%s]\n  expected [%s]\n", __FILE__, \
                    __LINE__, _got, (expect));                                             \
        }                                                                                  \
    } while (0)

/* ---- the cases ---------------------------------------------------------- */

/* Global filters first, then the route's; responses in reverse; logs in
 * chain order. */
static void test_order(void)
{
    char body[256];
    events_clear();
    int before = __atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST);
    CHECK_EQ_INT(get_once("/order/x", body, sizeof(body)), 200);
    CHECK(strcmp(body, "ok\n") == 0);
    CHECK(wait_event("b:log", 2000));
    CHECK_EVENTS(
        "g:request a:request b:request b:response a:response g:response g:log a:log b:log");
    CHECK_EQ_INT(__atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST), before + 1);
}

/* A filter answers: the rest of the chain and the upstream are skipped;
 * the filters before it see the answer; it is not asked about its own. */
static void test_answer(void)
{
    char body[256];
    events_clear();
    int before = __atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST);
    CHECK_EQ_INT(get_once("/answer/x", body, sizeof(body)), 403);
    CHECK(strcmp(body, "trace answer\n") == 0);
    CHECK(wait_event("b:log", 2000));
    CHECK_EVENTS("g:request a:request b:request a:response g:response g:log a:log b:log");
    CHECK_EQ_INT(__atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST), before);
}

/* Pause, then resume from a timer: the chain goes on where it stopped. */
static void test_pause_resume(void)
{
    char body[256];
    events_clear();
    CHECK_EQ_INT(get_once("/pause/x", body, sizeof(body)), 200);
    CHECK(strcmp(body, "ok\n") == 0);
    CHECK(wait_event("b:log", 2000));
    CHECK(wait_event("a:cleanup", 2000)); /* cleanups run when the request is freed */
    CHECK_EVENTS("g:request a:request a:resumed b:request b:response a:response g:response "
                 "g:log a:log b:log a:cleanup");
}

/* Pause, then answer from the timer. */
static void test_pause_respond(void)
{
    char body[256];
    events_clear();
    int before = __atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST);
    CHECK_EQ_INT(get_once("/pause_respond/x", body, sizeof(body)), 429);
    CHECK(strcmp(body, "paused answer\n") == 0);
    CHECK(wait_event("a:cleanup", 2000));
    CHECK_EVENTS("g:request a:request a:resumed g:response g:log a:log a:cleanup");
    CHECK_EQ_INT(__atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST), before);
}

/* Several requests paused on one keep-alive connection, one after the
 * other: each resumes into its own request. */
static void test_pause_keepalive(void)
{
    char body[256];
    int fd = client_connect();
    for (int i = 0; i < 5; i++) {
        events_clear();
        CHECK_EQ_INT(client_get(fd, "/pause/x", body, sizeof(body)), 200);
        CHECK(wait_event("b:log", 2000));
    }
    close(fd);
}

/* The client leaves while its request is paused: the module's cleanup
 * runs (freeing the timer), the timer never fires into the freed request,
 * nothing goes upstream, and the worker keeps serving. */
static void test_pause_then_disconnect(void)
{
    char body[256];
    for (int round = 0; round < 3; round++) {
        events_clear();
        int before = __atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST);
        int fd = client_connect();
        static const char req[] = "GET /pause_long/x HTTP/1.1\r\nHost: test\r\n\r\n";
        CHECK(write(fd, req, sizeof(req) - 1) == (ssize_t)(sizeof(req) - 1));
        CHECK(wait_event("a:request", 2000));
        if (round == 1)
            shutdown(fd, SHUT_WR); /* half-close: the request stays answerable */
        else
            close(fd);
        if (round == 1) {
            /* half-closed: nginx and HAProxy still answer; so do we, or
             * we close; either way the pause must end cleanly. */
            CHECK(wait_event("a:cleanup", 3000));
            close(fd);
        } else {
            CHECK(wait_event("a:cleanup", 3000));
            sleep_ms(400); /* past the 300 ms pause: the timer must not fire */
            CHECK(!events_have("a:resumed"));
            CHECK(!events_have("b:request"));
            CHECK_EQ_INT(__atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST), before);
        }
    }
    CHECK_EQ_INT(get_once("/order/x", body, sizeof(body)), 200);
}

/* A filter replaces the upstream's answer from the response phase; the
 * filters before it (later in response order) see the replacement. */
static void test_answer_from_response(void)
{
    char body[256];
    events_clear();
    int before = __atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST);
    CHECK_EQ_INT(get_once("/replace/x", body, sizeof(body)), 451);
    CHECK(strcmp(body, "replaced\n") == 0);
    CHECK(wait_event("b:log", 2000));
    CHECK_EVENTS(
        "g:request a:request b:request b:response a:response g:response g:log a:log b:log");
    CHECK_EQ_INT(__atomic_load_n(&upstream_requests, __ATOMIC_SEQ_CST), before + 1);
    /* The connection stays usable after a replaced answer. */
    int fd = client_connect();
    CHECK_EQ_INT(client_get(fd, "/replace/x", body, sizeof(body)), 451);
    CHECK_EQ_INT(client_get(fd, "/order/x", body, sizeof(body)), 200);
    close(fd);
}

/* Filters on a local ("respond") route and on Portico's own 404. */
static void test_local_answers(void)
{
    char body[256];
    events_clear();
    CHECK_EQ_INT(get_once("/local", body, sizeof(body)), 200);
    CHECK(strcmp(body, "local\n") == 0);
    CHECK(wait_event("a:log", 2000));
    CHECK_EVENTS("g:request a:request a:response g:response g:log a:log");
    events_clear();
    CHECK_EQ_INT(get_once("/nowhere", body, sizeof(body)), 404);
    CHECK(wait_event("g:log", 2000));
    CHECK_EVENTS("g:request g:response g:log");
}

/* module_metric_add remembers series per worker thread: the same
 * pointer holding another value must count into that value's series. */
static void test_module_metric_cache(void)
{
    struct metrics m;
    metrics_init(&m, 0);
    metrics_register(&m);
    metrics_set_thread(&m);
    char route[64];
    strcpy(route, "alpha");
    module_metric_add("t_cache_total", 1, "route", route, "outcome", "allowed");
    module_metric_add("t_cache_total", 2, "route", route, "outcome", "allowed");
    module_metric_add("t_cache_total", 4, "route", route, "outcome", "limited");
    strcpy(route, "beta");
    module_metric_add("t_cache_total", 8, "route", route, "outcome", "allowed");
    /* a value too long to remember still counts */
    memset(route, 'x', 60);
    route[60] = 0;
    module_metric_add("t_cache_total", 16, "route", route, "outcome", "allowed");
    module_metric_add("t_cache_total", 32, "route", route, "outcome", "allowed");
    module_metric_add("t_cache_plain_total", 64, NULL, NULL, NULL, NULL);
    module_metric_add("t_cache_plain_total", 64, NULL, NULL, NULL, NULL);
    CHECK(metrics_sum("t_cache_total", "route", "alpha", "outcome", "allowed") == 3);
    CHECK(metrics_sum("t_cache_total", "route", "alpha", "outcome", "limited") == 4);
    CHECK(metrics_sum("t_cache_total", "route", "beta", NULL, NULL) == 8);
    CHECK(metrics_sum("t_cache_total", "route", route, NULL, NULL) == 48);
    CHECK(metrics_sum("t_cache_plain_total", NULL, NULL, NULL, NULL) == 128);
    metrics_set_thread(NULL);
    metrics_unregister(&m);
    metrics_free(&m);
}

int main(void)
{
    int up_port;
    upstream_fd = listen_any(&up_port);
    pthread_t up;
    pthread_create(&up, NULL, upstream_main, NULL);
    gw_port = free_port();

    char json[4096];
    snprintf(
        json, sizeof(json),
        "{ \"workers\": 1, \"log_level\": \"error\","
        "  \"listeners\": [ { \"address\": \"127.0.0.1:%d\" } ],"
        "  \"access_log\": { \"path\": \"off\" },"
        "  \"upstreams\": { \"up\": { \"endpoints\": [\"127.0.0.1:%d\"] } },"
        "  \"filters\": [ { \"trace\": { \"name\": \"g\" } } ],"
        "  \"routes\": ["
        "    { \"path\": \"/order/\", \"upstream\": \"up\", \"filters\": ["
        "        { \"trace\": { \"name\": \"a\" } }, { \"trace\": { \"name\": \"b\" } } ] },"
        "    { \"path\": \"/answer/\", \"upstream\": \"up\", \"filters\": ["
        "        { \"trace\": { \"name\": \"a\" } },"
        "        { \"trace\": { \"name\": \"b\", \"on_request\": \"respond\", \"status\": 403 } },"
        "        { \"trace\": { \"name\": \"c\" } } ] },"
        "    { \"path\": \"/pause/\", \"upstream\": \"up\", \"filters\": ["
        "        { \"trace\": { \"name\": \"a\", \"on_request\": \"pause\" } },"
        "        { \"trace\": { \"name\": \"b\" } } ] },"
        "    { \"path\": \"/pause_respond/\", \"upstream\": \"up\", \"filters\": ["
        "        { \"trace\": { \"name\": \"a\", \"on_request\": \"pause_respond\", \"status\": "
        "429 } },"
        "        { \"trace\": { \"name\": \"b\" } } ] },"
        "    { \"path\": \"/pause_long/\", \"upstream\": \"up\", \"filters\": ["
        "        { \"trace\": { \"name\": \"a\", \"on_request\": \"pause\", \"pause_ms\": 300 } },"
        "        { \"trace\": { \"name\": \"b\" } } ] },"
        "    { \"path\": \"/replace/\", \"upstream\": \"up\", \"filters\": ["
        "        { \"trace\": { \"name\": \"a\", \"on_response\": \"respond\", \"status\": 451 } },"
        "        { \"trace\": { \"name\": \"b\" } } ] },"
        "    { \"path\": \"/local\", \"respond\": { \"status\": 200, \"body\": \"local\\n\" },"
        "      \"filters\": [ { \"trace\": { \"name\": \"a\" } } ] } ] }",
        gw_port, up_port);
    struct config_errors errs = { 0 };
    struct config *cfg = config_load_string(json, NULL, &errs);
    if (!cfg) {
        for (size_t i = 0; i < errs.n; i++)
            fprintf(stderr, "config: %s\n", errs.msgs[i]);
        return 1;
    }
    char err[256];
    int lfd = worker_listen_socket(&cfg->listeners[0], err, sizeof(err));
    if (lfd < 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    struct worker *w = worker_new(0, cfg, &lfd, err, sizeof(err));
    if (!w || worker_start(w) != 0) {
        fprintf(stderr, "worker: %s\n", err);
        return 1;
    }

    test_order();
    test_answer();
    test_pause_resume();
    test_pause_respond();
    test_pause_keepalive();
    test_pause_then_disconnect();
    test_answer_from_response();
    test_local_answers();
    test_module_metric_cache();

    worker_request_stop(w);
    pthread_join(w->thread, NULL);
    worker_free(w);
    config_unref(cfg);
    shutdown(upstream_fd, SHUT_RDWR);
    close(upstream_fd);
    pthread_join(up, NULL);
    return test_summary();
}
