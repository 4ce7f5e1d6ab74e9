/* Active health checks: one thread for the whole process, with its own
 * event base, so N workers do not each probe every endpoint. Each check
 * is one HTTP/1.1 GET on a fresh connection ("Connection: close"); the
 * status line decides. Results go into the endpoint's shared state
 * (ep_shared.healthy), which every worker reads with an atomic load.
 *
 * The thread owns its target list. health_apply (main thread) hands it a
 * new list under a mutex; the thread swaps lists on its next tick. A
 * target whose check is in flight at the swap is freed when the check
 * ends. */
#include "config.h"
#include "log.h"
#include "resil.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct check;

struct target {
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char *label; /* "upstream endpoint" for the log */
    char *req;   /* the whole request */
    int interval_ms, timeout_ms, healthy_threshold, unhealthy_threshold;
    uint8_t statuses[75];
    struct ep_shared *ep; /* a registry reference */
    uint64_t next_ms;
    int ok_run, fail_run;
    struct check *inflight;
    int orphan; /* dropped from the list while in flight */
    struct target *next;
};

struct check {
    struct target *t;
    struct bufferevent *bev;
    struct event *timer;
};

static pthread_mutex_t hlock = PTHREAD_MUTEX_INITIALIZER;
static struct target *incoming; /* under hlock */
static int have_incoming;       /* under hlock */
static _Atomic int stopping;
static int started;
static pthread_t thr;
static struct event_base *hbase;
static struct target *targets; /* the thread's own */

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void target_free(struct target *t)
{
    resil_ep_drop(t->ep);
    free(t->label);
    free(t->req);
    free(t);
}

static void check_done(struct check *ch, int ok, const char *why)
{
    struct target *t = ch->t;
    bufferevent_free(ch->bev);
    event_free(ch->timer);
    free(ch);
    t->inflight = NULL;
    if (t->orphan) {
        target_free(t);
        return;
    }
    if (ok) {
        t->ok_run++;
        t->fail_run = 0;
        if (!atomic_load(&t->ep->healthy) && t->ok_run >= t->healthy_threshold) {
            atomic_store(&t->ep->healthy, 1);
            log_info("health check: upstream %s is healthy again", t->label);
        }
    } else {
        t->fail_run++;
        t->ok_run = 0;
        if (atomic_load(&t->ep->healthy) && t->fail_run >= t->unhealthy_threshold) {
            atomic_store(&t->ep->healthy, 0);
            log_warn("health check: upstream %s is unhealthy: %s", t->label, why);
        }
    }
}

static void on_check_read(struct bufferevent *bev, void *arg)
{
    struct check *ch = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t n = 0;
    char *line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF);
    if (!line) {
        if (evbuffer_get_length(in) > 1024)
            check_done(ch, 0, "status line too long");
        return;
    }
    int status = 0;
    if (n >= 12 && strncmp(line, "HTTP/1.", 7) == 0 && line[8] == ' ')
        status = atoi(line + 9);
    free(line);
    char why[48];
    snprintf(why, sizeof(why), "status %d", status);
    check_done(ch, status && resil_status_in(ch->t->statuses, status), status ? why : "not HTTP");
}

static void on_check_event(struct bufferevent *bev, short what, void *arg)
{
    struct check *ch = arg;
    if (what & BEV_EVENT_CONNECTED) {
        bufferevent_write(bev, ch->t->req, strlen(ch->t->req));
        return;
    }
    check_done(ch, 0, (what & BEV_EVENT_EOF) ? "closed without answering" : "connection failed");
}

static void on_check_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    check_done(arg, 0, "timeout");
}

static void check_start(struct target *t)
{
    struct check *ch = xcalloc(1, sizeof(*ch));
    ch->t = t;
    ch->bev = bufferevent_socket_new(hbase, -1, BEV_OPT_CLOSE_ON_FREE);
    bufferevent_setcb(ch->bev, on_check_read, NULL, on_check_event, ch);
    bufferevent_enable(ch->bev, EV_READ | EV_WRITE);
    ch->timer = evtimer_new(hbase, on_check_timeout, ch);
    struct timeval tv = { t->timeout_ms / 1000, (t->timeout_ms % 1000) * 1000 };
    evtimer_add(ch->timer, &tv);
    t->inflight = ch;
    if (bufferevent_socket_connect(ch->bev, (struct sockaddr *)&t->addr, (int)t->addrlen) < 0)
        check_done(ch, 0, "cannot connect");
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (atomic_load(&stopping)) {
        event_base_loopbreak(hbase);
        return;
    }
    pthread_mutex_lock(&hlock);
    if (have_incoming) {
        while (targets) {
            struct target *t = targets;
            targets = t->next;
            if (t->inflight)
                t->orphan = 1;
            else
                target_free(t);
        }
        targets = incoming;
        incoming = NULL;
        have_incoming = 0;
    }
    pthread_mutex_unlock(&hlock);
    uint64_t now = mono_ms();
    for (struct target *t = targets; t; t = t->next) {
        if (t->inflight || now < t->next_ms)
            continue;
        t->next_ms = now + (uint64_t)t->interval_ms;
        check_start(t);
    }
}

static void *health_main(void *arg)
{
    (void)arg;
    struct event *tick = event_new(hbase, -1, EV_PERSIST, on_tick, NULL);
    struct timeval tv = { 0, 20000 };
    event_add(tick, &tv);
    event_base_dispatch(hbase);
    event_free(tick);
    while (targets) {
        struct target *t = targets;
        targets = t->next;
        if (t->inflight) {
            t->orphan = 1;
            check_done(t->inflight, 0, "stopping");
        } else {
            target_free(t);
        }
    }
    return NULL;
}

void health_apply(const struct config *c)
{
    struct target *list = NULL;
    for (size_t i = 0; i < c->nupstreams; i++) {
        const struct config_upstream *u = &c->upstreams[i];
        struct resil_upstream *ru = u->resil;
        if (!ru)
            continue;
        for (size_t e = 0; e < u->nendpoints; e++) {
            if (!ru->health.enabled) {
                /* Checks removed by a reload: nothing marks it down now. */
                atomic_store(&ru->eps[e]->healthy, 1);
                continue;
            }
            struct target *t = xcalloc(1, sizeof(*t));
            t->addr = u->endpoints[e].addr;
            t->addrlen = u->endpoints[e].addrlen;
            size_t ll = strlen(u->name) + strlen(u->endpoints[e].address) + 4;
            t->label = xmalloc(ll);
            snprintf(t->label, ll, "%s (%s)", u->name, u->endpoints[e].address);
            const char *host = ru->health.host ? ru->health.host : u->endpoints[e].address;
            size_t rl = strlen(ru->health.path) + strlen(host) + 96;
            t->req = xmalloc(rl);
            snprintf(t->req, rl,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: portico-health\r\nConnection: "
                     "close\r\n\r\n",
                     ru->health.path, host);
            t->interval_ms = ru->health.interval_ms;
            t->timeout_ms = ru->health.timeout_ms;
            t->healthy_threshold = ru->health.healthy_threshold;
            t->unhealthy_threshold = ru->health.unhealthy_threshold;
            memcpy(t->statuses, ru->health.statuses, sizeof(t->statuses));
            t->ep = resil_ep_hold(ru->eps[e]);
            t->next = list;
            list = t;
        }
    }
    pthread_mutex_lock(&hlock);
    while (incoming) {
        struct target *t = incoming;
        incoming = t->next;
        target_free(t);
    }
    incoming = list;
    have_incoming = 1;
    pthread_mutex_unlock(&hlock);
    if (!started && list) {
        hbase = event_base_new();
        if (!hbase || pthread_create(&thr, NULL, health_main, NULL) != 0) {
            log_error("health checks: cannot start their thread");
            return;
        }
        started = 1;
    }
}

void health_stop(void)
{
    if (started) {
        atomic_store(&stopping, 1);
        pthread_join(thr, NULL);
        event_base_free(hbase);
        started = 0;
    }
    pthread_mutex_lock(&hlock);
    while (incoming) {
        struct target *t = incoming;
        incoming = t->next;
        target_free(t);
    }
    have_incoming = 0;
    pthread_mutex_unlock(&hlock);
}
