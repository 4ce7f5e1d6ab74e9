#define _GNU_SOURCE /* pipe2 */
/* The admin listener (see admin.h). */
#include "admin.h"
#include "addr.h"
#include "config.h"
#include "log.h"
#include "metrics.h"
#include "resil.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <fcntl.h>
#include <time.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define RELOAD_POLL_MS 10
#define RELOAD_WAIT_MS 30000

struct admin {
    struct admin_env env;
    struct event_base *base;
    struct evhttp *http;
    int stop_fd[2];
    struct event *stop_ev;
    pthread_t thread;
    int fd; /* the listening socket (evhttp owns it) */
};

int admin_fd(const struct admin *a) { return a ? a->fd : -1; }

/* A POST /reload waiting for main to run it. */
struct pending_reload {
    struct admin *a;
    struct evhttp_request *req;
    unsigned ticket;
    int waited_ms;
    struct event *timer;
};

static void reply(struct evhttp_request *req, int code, const char *ctype, const char *body,
                  size_t len)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", ctype);
    evhttp_add_header(h, "Cache-Control", "no-store");
    struct evbuffer *b = evbuffer_new();
    if (len)
        evbuffer_add(b, body, len);
    const char *reason = code == 200   ? "OK"
                         : code == 401 ? "Unauthorized"
                         : code == 404 ? "Not Found"
                         : code == 405 ? "Method Not Allowed"
                         : code == 503 ? "Service Unavailable"
                                       : "Error";
    evhttp_send_reply(req, code, reason, b);
    evbuffer_free(b);
}

static void reply_json(struct evhttp_request *req, int code, json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    size_t n = s ? strlen(s) : 0;
    char *body = xmalloc(n + 2);
    memcpy(body, s ? s : "", n);
    body[n++] = '\n';
    reply(req, code, "application/json", body, n);
    free(body);
    free(s);
    json_decref(j);
}

static void reply_text(struct evhttp_request *req, int code, const char *text)
{
    reply(req, code, "text/plain; charset=utf-8", text, strlen(text));
}

/* Constant time in the length of the expected token. */
static int token_ok(const char *got, const char *want)
{
    size_t wl = strlen(want), gl = got ? strlen(got) : 0;
    unsigned char diff = (unsigned char)(gl != wl);
    for (size_t i = 0; i < wl; i++)
        diff |= (unsigned char)((i < gl ? got[i] : 0) ^ want[i]);
    return got && diff == 0;
}

static int authorized(struct evhttp_request *req, const struct config *cfg)
{
    if (!cfg->admin.token)
        return 1;
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return 0;
    return token_ok(h + 7, cfg->admin.token);
}

/* ---- /readyz --------------------------------------------------------------- */

/* Every upstream has an endpoint that is healthy and not ejected. */
static int endpoints_ready(const struct config *cfg, char *why, size_t whylen)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    for (size_t u = 0; u < cfg->nupstreams; u++) {
        const struct config_upstream *up = &cfg->upstreams[u];
        int any = 0;
        for (size_t e = 0; e < up->nendpoints && !any; e++)
            any = resil_ep_healthy(up, e) && strcmp(resil_ep_circuit(up, e, now), "open") != 0;
        if (!any) {
            snprintf(why, whylen, "upstream %s: no healthy endpoint", up->name);
            return 0;
        }
    }
    return 1;
}

/* ---- /upstreams --------------------------------------------------------- */

static json_t *upstreams_json(const struct config *cfg)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    json_t *out = json_object(), *ups = json_array();
    for (size_t u = 0; u < cfg->nupstreams; u++) {
        const struct config_upstream *up = &cfg->upstreams[u];
        json_t *eps = json_array();
        for (size_t e = 0; e < up->nendpoints; e++) {
            const char *addr = up->endpoints[e].address;
            json_array_append_new(
                eps,
                json_pack("{s:s, s:I, s:I, s:s, s:s, s:i}", "address", addr, "requests",
                          (json_int_t)metrics_sum("portico_upstream_requests_total", "upstream",
                                                  up->name, "endpoint", addr),
                          "errors",
                          (json_int_t)metrics_sum("portico_upstream_errors_total", "upstream",
                                                  up->name, "endpoint", addr),
                          "health", resil_ep_healthy(up, e) ? "healthy" : "unhealthy", "circuit",
                          resil_ep_circuit(up, e, now), "active", resil_ep_active(up, e)));
            if (up->endpoints[e].dns_host) {
                /* A host name slot: its current address, or null when empty. */
                struct sockaddr_storage ss;
                socklen_t sl;
                char shown[64];
                json_t *ep = json_array_get(eps, json_array_size(eps) - 1);
                if (resil_endpoint_addr(up, e, &ss, &sl, NULL) == 0) {
                    addr_format((struct sockaddr *)&ss, shown, sizeof(shown));
                    json_object_set_new(ep, "resolved", json_string(shown));
                } else {
                    json_object_set_new(ep, "resolved", json_null());
                }
            }
        }
        json_array_append_new(ups, json_pack("{s:s, s:o}", "name", up->name, "endpoints", eps));
    }
    json_object_set_new(out, "upstreams", ups);
    return out;
}

/* ---- /reload -------------------------------------------------------------- */

static void on_reload_poll(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct pending_reload *p = arg;
    char msg[1024] = "";
    int rc = p->a->env.reload_result(p->a->env.arg, p->ticket, msg, sizeof(msg));
    if (rc == 0 && p->waited_ms < RELOAD_WAIT_MS) {
        p->waited_ms += RELOAD_POLL_MS;
        struct timeval tv = { 0, RELOAD_POLL_MS * 1000 };
        evtimer_add(p->timer, &tv);
        return;
    }
    if (rc > 0)
        reply_json(p->req, 200, json_pack("{s:s}", "status", "reloaded"));
    else
        reply_json(p->req, rc < 0 ? 400 : 503,
                   json_pack("{s:s, s:s}", "status", "failed", "error",
                             rc < 0 ? msg : "the reload did not run in time"));
    event_free(p->timer);
    free(p);
}

static void start_reload(struct admin *a, struct evhttp_request *req)
{
    struct pending_reload *p = xcalloc(1, sizeof(*p));
    p->a = a;
    p->req = req;
    p->ticket = a->env.reload_start(a->env.arg);
    p->timer = evtimer_new(a->base, on_reload_poll, p);
    struct timeval tv = { 0, RELOAD_POLL_MS * 1000 };
    evtimer_add(p->timer, &tv);
}

/* ---- routing ---------------------------------------------------------------- */

static void on_request(struct evhttp_request *req, void *arg)
{
    struct admin *a = arg;
    const char *uri = evhttp_request_get_uri(req);
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    char path[64];
    size_t n = strcspn(uri, "?");
    snprintf(path, sizeof(path), "%.*s", (int)(n < sizeof(path) - 1 ? n : sizeof(path) - 1), uri);
    int get = cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD;

    if (strcmp(path, "/healthz") == 0) {
        if (!get)
            return reply_text(req, 405, "use GET\n");
        return reply_text(req, 200, "ok\n");
    }
    if (strcmp(path, "/readyz") == 0) {
        if (!get)
            return reply_text(req, 405, "use GET\n");
        if (a->env.draining(a->env.arg))
            return reply_text(req, 503, "draining\n");
        struct config *cfg = a->env.config_get(a->env.arg);
        char why[256] = "";
        int ok = (!cfg->admin.ready_modules || config_modules_ready(cfg, why, sizeof(why))) &&
                 (!cfg->admin.ready_endpoints || endpoints_ready(cfg, why, sizeof(why)));
        config_unref(cfg);
        if (!ok) {
            size_t wl = strlen(why);
            snprintf(why + wl, sizeof(why) - wl, "\n");
            return reply_text(req, 503, why);
        }
        return reply_text(req, 200, "ready\n");
    }
    struct config *cfg = a->env.config_get(a->env.arg);
    if (!authorized(req, cfg)) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate",
                          "Bearer realm=\"portico-admin\"");
        reply_text(req, 401, "admin token required\n");
    } else if (strcmp(path, "/metrics") == 0) {
        if (!get) {
            reply_text(req, 405, "use GET\n");
        } else {
            size_t len;
            char *text = metrics_render(&len, a->env.gauges, a->env.arg);
            reply(req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
            free(text);
        }
    } else if (strcmp(path, "/config") == 0) {
        if (!get)
            reply_text(req, 405, "use GET\n");
        else
            reply_json(req, 200, json_incref(cfg->json_redacted));
    } else if (strcmp(path, "/upstreams") == 0) {
        if (!get)
            reply_text(req, 405, "use GET\n");
        else
            reply_json(req, 200, upstreams_json(cfg));
    } else if (strcmp(path, "/reload") == 0) {
        if (cmd != EVHTTP_REQ_POST)
            reply_text(req, 405, "use POST\n");
        else
            start_reload(a, req);
    } else {
        reply_text(req, 404, "not found: /healthz /readyz /metrics /config /upstreams /reload\n");
    }
    config_unref(cfg);
}

/* ---- thread ---------------------------------------------------------------- */

static void on_stop(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    event_base_loopbreak(((struct admin *)arg)->base);
}

static void *admin_main(void *arg)
{
    struct admin *a = arg;
    event_base_dispatch(a->base);
    return NULL;
}

struct admin *admin_start(const struct config *cfg, const struct admin_env *env, int inherited_fd,
                          char *err, size_t errlen)
{
    const struct config_admin *ac = &cfg->admin;
    int fd = inherited_fd;
    int one = 1;
    if (fd < 0) {
        fd = socket(ac->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            snprintf(err, errlen, "admin %s: socket: %s", ac->address, strerror(errno));
            return NULL;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (const struct sockaddr *)&ac->addr, ac->addrlen) < 0 || listen(fd, 64) < 0) {
            snprintf(err, errlen, "admin %s: %s", ac->address, strerror(errno));
            close(fd);
            return NULL;
        }
    }
    struct admin *a = xcalloc(1, sizeof(*a));
    a->env = *env;
    a->fd = fd;
    a->base = event_base_new();
    a->http = a->base ? evhttp_new(a->base) : NULL;
    if (!a->http || pipe2(a->stop_fd, O_CLOEXEC | O_NONBLOCK) < 0) {
        snprintf(err, errlen, "admin: cannot set up its event loop");
        if (a->http)
            evhttp_free(a->http);
        if (a->base)
            event_base_free(a->base);
        close(fd);
        free(a);
        return NULL;
    }
    evhttp_set_allowed_methods(a->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD | EVHTTP_REQ_POST);
    evhttp_set_max_headers_size(a->http, 8192);
    evhttp_set_max_body_size(a->http, 4096);
    evhttp_set_timeout(a->http, 10);
    evhttp_set_gencb(a->http, on_request, a);
    evhttp_accept_socket_with_handle(a->http, fd);
    a->stop_ev = event_new(a->base, a->stop_fd[0], EV_READ, on_stop, a);
    event_add(a->stop_ev, NULL);
    if (pthread_create(&a->thread, NULL, admin_main, a) != 0) {
        snprintf(err, errlen, "admin: cannot start its thread");
        event_free(a->stop_ev);
        evhttp_free(a->http);
        event_base_free(a->base);
        close(a->stop_fd[0]);
        close(a->stop_fd[1]);
        free(a);
        return NULL;
    }
    return a;
}

void admin_stop(struct admin *a)
{
    if (!a)
        return;
    ssize_t n;
    do
        n = write(a->stop_fd[1], "s", 1);
    while (n < 0 && errno == EINTR);
    pthread_join(a->thread, NULL);
    evhttp_free(a->http);
    event_free(a->stop_ev);
    event_base_free(a->base);
    close(a->stop_fd[0]);
    close(a->stop_fd[1]);
    free(a);
}
