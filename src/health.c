/* The health/DNS thread: one thread for the whole process, with its own
 * event base, runs the active health checks and resolves the endpoints
 * given by host name (evdns), so N workers do not each probe every
 * endpoint or query DNS, and no worker ever waits for either.
 *
 * Health checks. Each check
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
#include <event2/dns.h>
#include <event2/event.h>
#include <event2/util.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct check;

struct target {
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int dns;     /* a host name slot: the address is ep's */
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

/* Host name resolution of one "host:port" endpoint into its slots.
 *
 * Each refresh_ms, one evdns_getaddrinfo. The answer's addresses go into
 * the slots: an address already in a slot stays there (its breaker state
 * too), vanished ones empty their slot, new ones take empty slots. A
 * failed resolution changes nothing: the last known addresses stay. */
struct dns_target {
    char *host;
    int port;
    char *label;
    int refresh_ms;
    char *hosts_file, *nameserver;
    struct ep_shared **slots; /* registry references */
    size_t nslots;
    uint64_t next_ms;
    struct evdns_base *dnsb;
    struct evdns_getaddrinfo_request *req;
    int orphan, failing;
    uint64_t started_ms; /* of the request in flight */
    struct dns_target *next;
};

/* A lookup still unanswered after this is cancelled (evdns's own
 * timeouts and attempts are set lower). */
#define DNS_GIVE_UP_MS 10000

static pthread_mutex_t hlock = PTHREAD_MUTEX_INITIALIZER;
static struct dns_target *dns_incoming; /* under hlock */
static struct dns_target *dns_targets;  /* the thread's own */
static struct target *incoming;         /* under hlock */
static int have_incoming;               /* under hlock */
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

static void dns_free(struct dns_target *d)
{
    for (size_t i = 0; i < d->nslots; i++)
        resil_ep_drop(d->slots[i]);
    free(d->slots);
    if (d->dnsb)
        evdns_base_free(d->dnsb, 0);
    free(d->host);
    free(d->label);
    free(d->hosts_file);
    free(d->nameserver);
    free(d);
}

static void on_dns_free_later(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    dns_free(arg);
}

static int same_addr(const struct sockaddr_storage *a, socklen_t al, const struct sockaddr *b,
                     socklen_t bl)
{
    return al == bl && memcmp(a, b, bl) == 0;
}

static void on_resolved(int result, struct evutil_addrinfo *res, void *arg)
{
    struct dns_target *d = arg;
    d->req = NULL;
    if (d->orphan) {
        if (res)
            evutil_freeaddrinfo(res);
        /* Not from inside its own base's callback. */
        struct timeval zero = { 0, 0 };
        event_base_once(hbase, -1, EV_TIMEOUT, on_dns_free_later, d, &zero);
        return;
    }
    if (result != 0 || !res) {
        if (!d->failing)
            log_warn("dns: %s: %s; keeping the last known addresses", d->label,
                     result == EVUTIL_EAI_CANCEL ? "no answer" : evutil_gai_strerror(result));
        d->failing = 1;
        return;
    }
    if (d->failing)
        log_info("dns: %s resolves again", d->label);
    d->failing = 0;
    struct sockaddr_storage found[64];
    socklen_t flen[64];
    size_t nf = 0;
    for (struct evutil_addrinfo *ai = res; ai && nf < d->nslots; ai = ai->ai_next) {
        if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
            ai->ai_addrlen > sizeof(found[0]))
            continue;
        int dup = 0;
        for (size_t k = 0; k < nf && !dup; k++)
            dup = same_addr(&found[k], flen[k], ai->ai_addr, (socklen_t)ai->ai_addrlen);
        if (dup)
            continue;
        memcpy(&found[nf], ai->ai_addr, ai->ai_addrlen);
        flen[nf] = (socklen_t)ai->ai_addrlen;
        if (ai->ai_family == AF_INET)
            ((struct sockaddr_in *)&found[nf])->sin_port = htons((uint16_t)d->port);
        else
            ((struct sockaddr_in6 *)&found[nf])->sin6_port = htons((uint16_t)d->port);
        nf++;
    }
    evutil_freeaddrinfo(res);
    int placed[64] = { 0 };
    /* This thread is the only writer: it may read the slots directly. */
    for (size_t i = 0; i < d->nslots; i++) {
        struct ep_shared *s = d->slots[i];
        if (!atomic_load(&s->present))
            continue;
        int keep = 0;
        for (size_t k = 0; k < nf && !keep; k++)
            if (!placed[k] &&
                same_addr(&s->addr, s->addrlen, (struct sockaddr *)&found[k], flen[k]))
                keep = placed[k] = 1;
        if (!keep)
            resil_slot_set(s, NULL, 0);
    }
    for (size_t k = 0; k < nf; k++) {
        if (placed[k])
            continue;
        for (size_t i = 0; i < d->nslots; i++)
            if (!atomic_load(&d->slots[i]->present)) {
                resil_slot_set(d->slots[i], (struct sockaddr *)&found[k], flen[k]);
                char shown[64];
                evutil_inet_ntop(found[k].ss_family,
                                 found[k].ss_family == AF_INET
                                     ? (void *)&((struct sockaddr_in *)&found[k])->sin_addr
                                     : (void *)&((struct sockaddr_in6 *)&found[k])->sin6_addr,
                                 shown, sizeof(shown));
                log_info("dns: %s: new address %s", d->label, shown);
                break;
            }
    }
}

static void dns_start(struct dns_target *d)
{
    if (!d->dnsb) {
        d->dnsb = evdns_base_new(hbase, 0);
        if (!d->dnsb)
            return;
        if (d->nameserver)
            evdns_base_nameserver_ip_add(d->dnsb, d->nameserver);
        else if (!d->hosts_file)
            evdns_base_resolv_conf_parse(d->dnsb, DNS_OPTIONS_ALL, "/etc/resolv.conf");
        evdns_base_set_option(d->dnsb, "timeout:", "2");
        evdns_base_set_option(d->dnsb, "attempts:", "2");
    }
    /* Read again at each refresh, so a changed file is followed. */
    evdns_base_clear_host_addresses(d->dnsb);
    if (d->hosts_file || !d->nameserver)
        evdns_base_load_hosts(d->dnsb, d->hosts_file);
    struct evutil_addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    char port[8];
    snprintf(port, sizeof(port), "%d", d->port);
    d->req = NULL;
    struct evdns_getaddrinfo_request *req =
        evdns_getaddrinfo(d->dnsb, d->host, port, &hints, on_resolved, d);
    /* NULL: answered already (hosts file), the callback has run. With no
     * name server to ask, a name the hosts file lacks fails now rather
     * than waiting in evdns's queue for a server. */
    if (req) {
        d->req = req;
        d->started_ms = mono_ms();
        if (evdns_base_count_nameservers(d->dnsb) == 0)
            evdns_getaddrinfo_cancel(req);
    }
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
    if (t->dns && resil_slot_addr(t->ep, &t->addr, &t->addrlen, NULL) < 0) {
        check_done(ch, 1, "no address yet"); /* an empty slot is never picked anyway */
        return;
    }
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
        while (dns_targets) {
            struct dns_target *d = dns_targets;
            dns_targets = d->next;
            if (d->req) {
                d->orphan = 1;
                evdns_getaddrinfo_cancel(d->req);
            } else {
                dns_free(d);
            }
        }
        dns_targets = dns_incoming;
        dns_incoming = NULL;
        have_incoming = 0;
    }
    pthread_mutex_unlock(&hlock);
    uint64_t now = mono_ms();
    for (struct dns_target *d = dns_targets; d; d = d->next) {
        if (d->req && now - d->started_ms > DNS_GIVE_UP_MS)
            evdns_getaddrinfo_cancel(d->req); /* counts as a failure */
        if (d->req || now < d->next_ms)
            continue;
        d->next_ms = now + (uint64_t)d->refresh_ms;
        dns_start(d);
    }
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
    while (dns_targets) {
        struct dns_target *d = dns_targets;
        dns_targets = d->next;
        if (d->req) {
            d->orphan = 1;
            evdns_getaddrinfo_cancel(d->req);
        } else {
            dns_free(d);
        }
    }
    event_base_loop(hbase, EVLOOP_NONBLOCK); /* run the deferred frees */
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
    struct dns_target *dlist = NULL;
    for (size_t i = 0; i < c->nupstreams; i++) {
        const struct config_upstream *u = &c->upstreams[i];
        struct resil_upstream *ru = u->resil;
        if (!ru)
            continue;
        for (size_t e = 0; e < u->nendpoints; e++) {
            const struct config_endpoint *ep = &u->endpoints[e];
            if (ep->dns_host && ep->dns_slot == 0) {
                struct dns_target *d = xcalloc(1, sizeof(*d));
                d->host = xstrdup(ep->dns_host);
                d->port = ep->dns_port;
                size_t ll = strlen(u->name) + strlen(ep->dns_host) + 16;
                d->label = xmalloc(ll);
                snprintf(d->label, ll, "%s (%s:%d)", u->name, ep->dns_host, ep->dns_port);
                d->refresh_ms = ru->dns.refresh_ms;
                d->hosts_file = ru->dns.hosts_file ? xstrdup(ru->dns.hosts_file) : NULL;
                d->nameserver = ru->dns.nameserver ? xstrdup(ru->dns.nameserver) : NULL;
                d->nslots = (size_t)ru->dns.max_addresses;
                d->slots = xcalloc(d->nslots, sizeof(*d->slots));
                for (size_t k = 0; k < d->nslots && e + k < u->nendpoints; k++)
                    d->slots[k] = resil_ep_hold(ru->eps[e + k]);
                d->next = dlist;
                dlist = d;
            }
            if (!ru->health.enabled) {
                /* Checks removed by a reload: nothing marks it down now. */
                atomic_store(&ru->eps[e]->healthy, 1);
                continue;
            }
            struct target *t = xcalloc(1, sizeof(*t));
            t->addr = u->endpoints[e].addr;
            t->addrlen = u->endpoints[e].addrlen;
            t->dns = u->endpoints[e].dns_host != NULL;
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
    while (dns_incoming) {
        struct dns_target *d = dns_incoming;
        dns_incoming = d->next;
        dns_free(d);
    }
    dns_incoming = dlist;
    have_incoming = 1;
    pthread_mutex_unlock(&hlock);
    if (!started && (list || dlist)) {
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
    while (dns_incoming) {
        struct dns_target *d = dns_incoming;
        dns_incoming = d->next;
        dns_free(d);
    }
    have_incoming = 0;
    pthread_mutex_unlock(&hlock);
}
