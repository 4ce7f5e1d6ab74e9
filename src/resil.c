#include "resil.h"
#include "config.h"
#include "http1.h"
#include "log.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- the process-wide registry ------------------------------------------ */

struct reg_entry {
    char *key;
    int refs;
    void *state; /* struct ep_shared or struct up_shared */
    struct reg_entry *next;
};

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct reg_entry *reg_eps, *reg_ups;

static void *reg_get(struct reg_entry **list, const char *key, size_t size, int is_ep)
{
    pthread_mutex_lock(&reg_lock);
    struct reg_entry *e;
    for (e = *list; e; e = e->next)
        if (strcmp(e->key, key) == 0)
            break;
    if (!e) {
        e = xcalloc(1, sizeof(*e));
        e->key = xstrdup(key);
        e->state = xcalloc(1, size);
        if (is_ep)
            atomic_store(&((struct ep_shared *)e->state)->healthy, 1);
        e->next = *list;
        *list = e;
    }
    e->refs++;
    pthread_mutex_unlock(&reg_lock);
    return e->state;
}

static void reg_put(struct reg_entry **list, void *state)
{
    pthread_mutex_lock(&reg_lock);
    for (struct reg_entry **pp = list; *pp; pp = &(*pp)->next) {
        struct reg_entry *e = *pp;
        if (e->state != state)
            continue;
        if (--e->refs == 0) {
            *pp = e->next;
            free(e->key);
            free(e->state);
            free(e);
        }
        break;
    }
    pthread_mutex_unlock(&reg_lock);
}

struct ep_shared *resil_ep_hold(struct ep_shared *s)
{
    pthread_mutex_lock(&reg_lock);
    for (struct reg_entry *e = reg_eps; e; e = e->next)
        if (e->state == s)
            e->refs++;
    pthread_mutex_unlock(&reg_lock);
    return s;
}

void resil_ep_drop(struct ep_shared *s)
{
    reg_put(&reg_eps, s);
}

void resil_upstream_build(struct config_upstream *u)
{
    struct resil_upstream *ru = u->resil;
    size_t n = u->nendpoints;
    ru->shared = reg_get(&reg_ups, u->name, sizeof(struct up_shared), 0);
    ru->eps = xcalloc(n ? n : 1, sizeof(*ru->eps));
    ru->neps = n;
    const char **addrs = xcalloc(n ? n : 1, sizeof(*addrs));
    int total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(u->name) + strlen(u->endpoints[i].address) + 2;
        char *key = xmalloc(len);
        snprintf(key, len, "%s\x01%s", u->name, u->endpoints[i].address);
        ru->eps[i] = reg_get(&reg_eps, key, sizeof(struct ep_shared), 1);
        free(key);
        if (!u->endpoints[i].dns_host)
            atomic_store(&ru->eps[i]->present, 1);
        addrs[i] = u->endpoints[i].address;
        total += ru->weights[i];
    }
    ru->schedule = xcalloc(total ? (size_t)total : 1, sizeof(*ru->schedule));
    ru->nschedule = balance_wrr_schedule(ru->weights, n, ru->schedule);
    if (ru->balance == BAL_HASH)
        balance_ring_build(&ru->ring, addrs, ru->weights, n);
    free(addrs);
}

void resil_upstream_free(struct resil_upstream *ru)
{
    if (!ru)
        return;
    for (size_t i = 0; i < ru->neps; i++)
        if (ru->eps[i])
            reg_put(&reg_eps, ru->eps[i]);
    if (ru->shared)
        reg_put(&reg_ups, ru->shared);
    free(ru->eps);
    free(ru->weights);
    free(ru->schedule);
    balance_ring_free(&ru->ring);
    free(ru->hash_name);
    free(ru->health.path);
    free(ru->health.host);
    free(ru->dns.hosts_file);
    free(ru->dns.nameserver);
    free(ru);
}

/* ---- the request path ---------------------------------------------------- */

int resil_admit(struct resil_req *rq, struct resil_upstream *ru, uint64_t now_ms)
{
    rq->ru = ru;
    rq->idx = -1;
    if (ru->max_requests) {
        int act = atomic_fetch_add(&ru->shared->active, 1);
        rq->counted = 1;
        if (act >= ru->max_requests)
            return -1;
    }
    if (ru->retry.attempts > 1)
        budget_note_request(ru->shared, now_ms);
    return 0;
}

/* The value of cookie name in a Cookie header, or NULL. */
static const char *cookie_value(const char *s, size_t n, const char *name, size_t *vlen)
{
    size_t nl = strlen(name);
    size_t i = 0;
    while (i < n) {
        while (i < n && (s[i] == ' ' || s[i] == ';'))
            i++;
        size_t start = i;
        while (i < n && s[i] != ';')
            i++;
        if (i - start > nl && memcmp(s + start, name, nl) == 0 && s[start + nl] == '=') {
            *vlen = i - start - nl - 1;
            return s + start + nl + 1;
        }
    }
    return NULL;
}

static int hash_key(const struct resil_upstream *ru, const struct http_request *h,
                    const char *client_ip, uint64_t *out)
{
    if (ru->hash_on == HASH_CLIENT_ADDRESS) {
        if (!client_ip)
            return 0;
        *out = balance_hash(client_ip, strlen(client_ip));
        return 1;
    }
    const char *want = ru->hash_on == HASH_HEADER ? ru->hash_name : "cookie";
    size_t wl = strlen(want);
    for (size_t i = 0; i < h->nheaders; i++) {
        const struct http_header *hd = &h->headers[i];
        if (hd->name.len != wl || strncasecmp(hd->name.p, want, wl) != 0)
            continue;
        if (ru->hash_on == HASH_HEADER) {
            *out = balance_hash(hd->value.p, hd->value.len);
            return 1;
        }
        size_t vl;
        const char *v = cookie_value(hd->value.p, hd->value.len, ru->hash_name, &vl);
        if (v) {
            *out = balance_hash(v, vl);
            return 1;
        }
    }
    return 0;
}

static int tried(const struct resil_req *rq, size_t i)
{
    return (rq->tried >> (i % 64)) & 1;
}

int resil_pick(struct resil_req *rq, const struct config_upstream *u, uint32_t *rr,
               const struct http_request *h, const char *client_ip, double (*rnd)(void *),
               void *rarg, uint64_t now_ms)
{
    struct resil_upstream *ru = u->resil;
    size_t n = u->nendpoints;
    int stack[64];
    int *cand = n <= 64 ? stack : xcalloc(n, sizeof(*cand));
    int picked = -1;
    /* Up to n rounds: a candidate may lose a race for its last half-open
     * trial slot, and is then dropped from the next round. */
    uint64_t refused = 0;
    for (size_t round = 0; round < n && picked < 0; round++) {
        size_t nc = 0, nfresh = 0;
        for (int pass = 0; pass < 2 && nc == 0; pass++) {
            for (size_t i = 0; i < n; i++) {
                if ((refused >> (i % 64)) & 1)
                    continue;
                if (pass == 0 && tried(rq, i))
                    continue;
                if (breaker_available(ru->eps[i], &ru->breaker, now_ms))
                    cand[nc++] = (int)i;
            }
            if (pass == 0)
                nfresh = nc;
        }
        (void)nfresh;
        if (nc == 0)
            break;
        int choice = cand[0];
        switch (ru->balance) {
        case BAL_ROUND_ROBIN: {
            uint32_t pos = *rr;
            for (size_t k = 0; k < ru->nschedule; k++) {
                int e = ru->schedule[(pos + k) % ru->nschedule];
                int ok = 0;
                for (size_t j = 0; j < nc && !ok; j++)
                    ok = cand[j] == e;
                if (ok) {
                    choice = e;
                    *rr = pos + (uint32_t)k + 1;
                    break;
                }
            }
            break;
        }
        case BAL_RANDOM:
            choice = balance_weighted_random(cand, nc, ru->weights, rnd(rarg));
            break;
        case BAL_LEAST_REQUEST: {
            int act_stack[64];
            int *act = n <= 64 ? act_stack : xcalloc(n, sizeof(*act));
            for (size_t j = 0; j < nc; j++)
                act[cand[j]] = atomic_load(&ru->eps[cand[j]]->active);
            choice = balance_p2c(cand, nc, ru->weights, act, rnd(rarg), rnd(rarg));
            if (act != act_stack)
                free(act);
            break;
        }
        case BAL_HASH: {
            uint64_t key;
            if (!hash_key(ru, h, client_ip, &key)) {
                choice = cand[(*rr)++ % nc];
                break;
            }
            size_t pos = balance_ring_find(&ru->ring, key);
            for (size_t k = 0; k < ru->ring.n; k++) {
                int e = ru->ring.ep[(pos + k) % ru->ring.n];
                int ok = 0;
                for (size_t j = 0; j < nc && !ok; j++)
                    ok = cand[j] == e;
                if (ok) {
                    choice = e;
                    break;
                }
            }
            break;
        }
        }
        int got = breaker_acquire(ru->eps[choice], &ru->breaker, now_ms);
        if (!got) {
            refused |= 1ull << (choice % 64);
            continue;
        }
        picked = choice;
        rq->trial = got == 2;
    }
    if (cand != stack)
        free(cand);
    if (picked < 0)
        return -1;
    rq->idx = picked;
    rq->tried |= 1ull << (picked % 64);
    rq->ep = ru->eps[picked];
    rq->verdict = 0;
    rq->attempts++;
    atomic_fetch_add(&rq->ep->active, 1);
    return picked;
}

int resil_pending(struct resil_req *rq, int on)
{
    struct up_shared *s = rq->ru->shared;
    if (on && !rq->pending) {
        int p = atomic_fetch_add(&s->pending, 1);
        rq->pending = 1;
        if (rq->ru->max_pending && p >= rq->ru->max_pending)
            return -1;
    } else if (!on && rq->pending) {
        atomic_fetch_sub(&s->pending, 1);
        rq->pending = 0;
    }
    return 0;
}

int resil_verdict(struct resil_req *rq, int ok, uint64_t now_ms)
{
    if (!rq->ep || rq->verdict)
        return 0;
    rq->verdict = 1;
    rq->trial = 0;
    struct resil_upstream *ru = rq->ru;
    return breaker_report(ru->eps, ru->neps, (size_t)rq->idx, &ru->breaker, ok, now_ms);
}

int resil_may_retry(struct resil_req *rq, unsigned kind, int status, int idempotent, int replayable,
                    uint64_t now_ms, int *exhausted)
{
    const struct resil_retry *rt = &rq->ru->retry;
    *exhausted = 0;
    if (rq->attempts >= rt->attempts || !replayable || (!idempotent && !rt->non_idempotent))
        return 0;
    if (kind ? !(rt->on & kind) : !resil_status_in(rt->on_status, status))
        return 0;
    if (!budget_take_retry(rq->ru->shared, rt->budget_percent, rt->min_retries_per_second,
                           now_ms)) {
        *exhausted = 1;
        return 0;
    }
    return 1;
}

uint64_t resil_backoff_ms(const struct resil_req *rq, double u)
{
    const struct resil_retry *rt = &rq->ru->retry;
    if (rt->backoff_ms <= 0)
        return 0;
    uint64_t b = (uint64_t)rt->backoff_ms;
    for (int i = 1; i < rq->attempts && b < (uint64_t)rt->max_backoff_ms; i++)
        b *= 2;
    if (b > (uint64_t)rt->max_backoff_ms)
        b = (uint64_t)rt->max_backoff_ms;
    /* Jitter: anywhere from half to all of it, so retries of many
     * clients do not arrive together. */
    return b / 2 + (uint64_t)(u * (double)(b - b / 2));
}

void resil_try_end(struct resil_req *rq)
{
    if (rq->ep) {
        atomic_fetch_sub(&rq->ep->active, 1);
        if (rq->trial)
            breaker_release_trial(rq->ep);
    }
    rq->ep = NULL;
    rq->trial = 0;
    rq->try_deadline_ms = 0;
    if (rq->pending)
        resil_pending(rq, 0);
}

void resil_req_end(struct resil_req *rq)
{
    if (!rq->ru)
        return;
    resil_try_end(rq);
    if (rq->counted)
        atomic_fetch_sub(&rq->ru->shared->active, 1);
    rq->counted = 0;
    rq->ru = NULL;
}

int resil_retry_after(const struct http_response *resp)
{
    for (size_t i = 0; i < resp->nheaders; i++) {
        const struct http_header *h = &resp->headers[i];
        if (h->name.len != 11 || strncasecmp(h->name.p, "retry-after", 11) != 0)
            continue;
        int v = 0;
        for (size_t k = 0; k < h->value.len; k++) {
            char ch = h->value.p[k];
            if (ch < '0' || ch > '9')
                return h->value.len ? 3600 : -1; /* an HTTP date: treat as long */
            if (v < 100000)
                v = v * 10 + (ch - '0');
        }
        return h->value.len ? v : -1;
    }
    return -1;
}

int resil_endpoint_addr(const struct config_upstream *u, size_t e, struct sockaddr_storage *ss,
                        socklen_t *len, uint32_t *gen)
{
    const struct config_endpoint *ep = &u->endpoints[e];
    if (!ep->dns_host || !u->resil) {
        *ss = ep->addr;
        *len = ep->addrlen;
        if (gen)
            *gen = 0;
        return 0;
    }
    return resil_slot_addr(u->resil->eps[e], ss, len, gen);
}

int resil_slot_addr(struct ep_shared *s, struct sockaddr_storage *ss, socklen_t *len, uint32_t *gen)
{
    for (;;) {
        uint32_t a = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (a & 1)
            continue;
        int present = atomic_load(&s->present);
        memcpy(ss, &s->addr, sizeof(*ss));
        *len = s->addrlen;
        uint32_t g = atomic_load(&s->gen);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&s->seq, memory_order_relaxed) != a)
            continue;
        if (gen)
            *gen = g;
        return present ? 0 : -1;
    }
}

void resil_slot_set(struct ep_shared *s, const struct sockaddr *sa, socklen_t len)
{
    if (len && atomic_load(&s->present) && s->addrlen == len && memcmp(&s->addr, sa, len) == 0)
        return;
    if (!len && !atomic_load(&s->present))
        return;
    atomic_fetch_add_explicit(&s->seq, 1, memory_order_acq_rel);
    atomic_thread_fence(memory_order_release);
    if (len)
        memcpy(&s->addr, sa, len);
    s->addrlen = len;
    atomic_fetch_add(&s->gen, 1);
    atomic_store(&s->present, len ? 1 : 0);
    atomic_fetch_add_explicit(&s->seq, 1, memory_order_release);
}

/* ---- admin ---------------------------------------------------------------- */

const char *resil_ep_circuit(const struct config_upstream *u, size_t e, uint64_t now_ms)
{
    if (!u->resil || e >= u->resil->neps)
        return "closed";
    return breaker_state_name(breaker_state_now(u->resil->eps[e], now_ms));
}

int resil_ep_healthy(const struct config_upstream *u, size_t e)
{
    return !u->resil || e >= u->resil->neps || atomic_load(&u->resil->eps[e]->healthy);
}

int resil_ep_active(const struct config_upstream *u, size_t e)
{
    return u->resil && e < u->resil->neps ? atomic_load(&u->resil->eps[e]->active) : 0;
}
