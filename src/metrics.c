/* Per-thread metric tables and the Prometheus text exposition (see
 * metrics.h for the threading contract). */
#include "metrics.h"
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct metric_series {
    uint64_t hash;
    enum metric_kind kind;
    char *name;
    char *k[3], *v[3];
    uint64_t value;
    struct metric_hist hist;
};

/* Upper bounds in microseconds; the last bucket is +Inf. */
static const uint64_t bucket_us[METRICS_BUCKETS - 1] = {
    1000, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 10000000,
};

struct metrics_globals metrics_globals;

static struct metrics shared_table;
static pthread_once_t shared_once = PTHREAD_ONCE_INIT;
static __thread struct metrics *self;

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct metrics **registry;
static size_t nregistry;

static void shared_init(void)
{
    metrics_init(&shared_table, 1);
    metrics_register(&shared_table);
}

void metrics_init(struct metrics *m, int shared)
{
    memset(m, 0, sizeof(*m));
    pthread_mutex_init(&m->lock, NULL);
    m->shared = shared;
    m->cap = 64;
    m->slot = xcalloc(m->cap, sizeof(*m->slot));
}

void metrics_free(struct metrics *m)
{
    for (size_t i = 0; i < m->cap; i++) {
        struct metric_series *s = m->slot[i];
        if (!s)
            continue;
        free(s->name);
        for (int k = 0; k < 3; k++) {
            free(s->k[k]);
            free(s->v[k]);
        }
        free(s);
    }
    free(m->slot);
    m->slot = NULL;
    pthread_mutex_destroy(&m->lock);
}

void metrics_set_thread(struct metrics *m) { self = m; }

struct metrics *metrics_thread(void)
{
    if (self)
        return self;
    pthread_once(&shared_once, shared_init);
    return &shared_table;
}

void metrics_register(struct metrics *m)
{
    pthread_mutex_lock(&registry_lock);
    registry = xrealloc(registry, (nregistry + 1) * sizeof(*registry));
    registry[nregistry++] = m;
    pthread_mutex_unlock(&registry_lock);
}

void metrics_unregister(struct metrics *m)
{
    pthread_mutex_lock(&registry_lock);
    for (size_t i = 0; i < nregistry; i++) {
        if (registry[i] == m) {
            registry[i] = registry[--nregistry];
            break;
        }
    }
    pthread_mutex_unlock(&registry_lock);
}

/* ---- finding a series ----------------------------------------------------- */

static uint64_t mix(uint64_t h, const char *s)
{
    if (!s)
        return h * 1099511628211ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return (h ^ 0xff) * 1099511628211ULL;
}

static int same(const char *a, const char *b) { return a == b || (a && b && strcmp(a, b) == 0); }

static int matches(const struct metric_series *s, uint64_t h, const char *name, const char *const *k,
                   const char *const *v)
{
    if (s->hash != h || strcmp(s->name, name) != 0)
        return 0;
    for (int i = 0; i < 3; i++)
        if (!same(s->k[i], k[i]) || !same(s->v[i], v[i]))
            return 0;
    return 1;
}

static void grow(struct metrics *m)
{
    size_t ncap = m->cap * 2;
    struct metric_series **ns = xcalloc(ncap, sizeof(*ns));
    for (size_t i = 0; i < m->cap; i++) {
        struct metric_series *s = m->slot[i];
        if (!s)
            continue;
        size_t j = s->hash & (ncap - 1);
        while (ns[j])
            j = (j + 1) & (ncap - 1);
        ns[j] = s;
    }
    free(m->slot);
    m->slot = ns;
    m->cap = ncap;
}

/* The series, created when new. The owner calls this without the lock
 * (it is the only writer of the table); creation takes it so a scrape
 * never sees the table half-changed. */
static struct metric_series *series(struct metrics *m, enum metric_kind kind, const char *name,
                                    const char *const *k, const char *const *v)
{
    uint64_t h = mix(14695981039346656037ULL, name);
    for (int i = 0; i < 3; i++)
        h = mix(mix(h, k[i]), v[i]);
    size_t j = h & (m->cap - 1);
    for (struct metric_series *s; (s = m->slot[j]) != NULL; j = (j + 1) & (m->cap - 1))
        if (matches(s, h, name, k, v))
            return s;
    struct metric_series *s = xcalloc(1, sizeof(*s));
    s->hash = h;
    s->kind = kind;
    s->name = xstrdup(name);
    for (int i = 0; i < 3; i++) {
        s->k[i] = k[i] ? xstrdup(k[i]) : NULL;
        s->v[i] = k[i] ? xstrdup(v[i] ? v[i] : "") : NULL;
    }
    if (!m->shared)
        pthread_mutex_lock(&m->lock);
    if ((m->n + 1) * 2 > m->cap) {
        grow(m);
        j = h & (m->cap - 1);
        while (m->slot[j])
            j = (j + 1) & (m->cap - 1);
    }
    m->slot[j] = s;
    m->n++;
    if (!m->shared)
        pthread_mutex_unlock(&m->lock);
    return s;
}

static void bump(uint64_t *p, uint64_t n)
{
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

void metrics_series_add(struct metric_series *s, uint64_t n) { bump(&s->value, n); }

void metrics_series_observe_us(struct metric_series *s, uint64_t us)
{
    size_t b = 0;
    while (b < METRICS_BUCKETS - 1 && us > bucket_us[b])
        b++;
    bump(&s->hist.bucket[b], 1);
    bump(&s->hist.count, 1);
    bump(&s->hist.sum_us, us);
}

struct metric_series *metrics_counter(struct metrics *m, const char *name, const char *k1,
                                      const char *v1, const char *k2, const char *v2,
                                      const char *k3, const char *v3)
{
    const char *k[3] = { k1, k1 ? k2 : NULL, k1 && k2 ? k3 : NULL };
    const char *v[3] = { v1, v2, v3 };
    return series(m, METRIC_COUNTER, name, k, v);
}

struct metric_series *metrics_histogram(struct metrics *m, const char *name, const char *k1,
                                        const char *v1, const char *k2, const char *v2)
{
    const char *k[3] = { k1, k1 ? k2 : NULL, NULL };
    const char *v[3] = { v1, v2, NULL };
    return series(m, METRIC_HISTOGRAM, name, k, v);
}

void metrics_add(struct metrics *m, const char *name, uint64_t n, const char *k1, const char *v1,
                 const char *k2, const char *v2, const char *k3, const char *v3)
{
    if (m->shared)
        pthread_mutex_lock(&m->lock);
    metrics_series_add(metrics_counter(m, name, k1, v1, k2, v2, k3, v3), n);
    if (m->shared)
        pthread_mutex_unlock(&m->lock);
}

void metrics_observe_us(struct metrics *m, const char *name, uint64_t us, const char *k1,
                        const char *v1, const char *k2, const char *v2)
{
    if (m->shared)
        pthread_mutex_lock(&m->lock);
    metrics_series_observe_us(metrics_histogram(m, name, k1, v1, k2, v2), us);
    if (m->shared)
        pthread_mutex_unlock(&m->lock);
}

/* ---- the exposition ------------------------------------------------------- */

void metrics_printf(char **buf, size_t *len, size_t *cap, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(*buf + *len, *cap - *len, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if ((size_t)n < *cap - *len) {
            *len += (size_t)n;
            return;
        }
        *cap = (*cap + (size_t)n + 1) * 2;
        *buf = xrealloc(*buf, *cap);
    }
}

/* One series as seen by a scrape: its labels as text, values summed. */
struct flat {
    const char *name;
    char *labels; /* k="v",k="v" escaped */
    enum metric_kind kind;
    uint64_t value;
    struct metric_hist hist;
};

static void escape_into(char **b, size_t *len, size_t *cap, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            metrics_printf(b, len, cap, "\\%c", *s);
        else if (*s == '\n')
            metrics_printf(b, len, cap, "\\n");
        else
            metrics_printf(b, len, cap, "%c", *s);
    }
}

static char *labels_text(const struct metric_series *s)
{
    size_t len = 0, cap = 64;
    char *b = xmalloc(cap);
    b[0] = 0;
    for (int i = 0; i < 3 && s->k[i]; i++) {
        metrics_printf(&b, &len, &cap, "%s%s=\"", i ? "," : "", s->k[i]);
        escape_into(&b, &len, &cap, s->v[i]);
        metrics_printf(&b, &len, &cap, "\"");
    }
    return b;
}

static int flat_order(const void *a, const void *b)
{
    const struct flat *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : strcmp(x->labels, y->labels);
}

static const struct {
    const char *name, *help;
} helps[] = {
    { "portico_requests_total", "Requests answered, by route, method and status class." },
    { "portico_request_duration_seconds", "Time from the request head to the end of the answer." },
    { "portico_upstream_requests_total", "Requests sent to upstream endpoints, by status class." },
    { "portico_upstream_duration_seconds", "Time from sending to an upstream to its whole answer." },
    { "portico_upstream_errors_total",
      "Upstream failures: connect errors, timeouts, resets, bad answers." },
    { "portico_connections_accepted_total", "Client connections accepted." },
    { "portico_websocket_tunnels_opened_total", "WebSocket tunnels opened (upstream 101), by route." },
    { "portico_websocket_tunnels_closed_total",
      "WebSocket tunnels closed, by route and reason (client_closed, upstream_closed, "
      "idle_timeout, max_lifetime, send_timeout, upstream_error, shutdown)." },
    { "portico_tls_handshakes_total",
      "TLS handshakes with clients and upstreams: full, resumed, failed, timeout, plain_http." },
    { "portico_jwt_requests_total", "jwt_auth decisions, by outcome and refusal reason." },
    { "portico_jwt_key_fetches_total", "JWKS and discovery fetches, by provider and result." },
    { "portico_rate_limit_decisions_total", "rate_limit decisions, by route and outcome." },
    { "portico_rate_limit_redis_fallbacks_total",
      "Requests decided by on_redis_error because Redis could not answer." },
};

static const char *help_of(const char *name)
{
    for (size_t i = 0; i < sizeof(helps) / sizeof(helps[0]); i++)
        if (strcmp(helps[i].name, name) == 0)
            return helps[i].help;
    return NULL;
}

char *metrics_render(size_t *len, void (*extra)(void *arg, char **buf, size_t *len, size_t *cap),
                     void *arg)
{
    struct flat *f = NULL;
    size_t nf = 0, cf = 0;
    pthread_once(&shared_once, shared_init);
    pthread_mutex_lock(&registry_lock);
    for (size_t r = 0; r < nregistry; r++) {
        struct metrics *m = registry[r];
        pthread_mutex_lock(&m->lock);
        for (size_t i = 0; i < m->cap; i++) {
            struct metric_series *s = m->slot[i];
            if (!s)
                continue;
            if (nf == cf) {
                cf = cf ? cf * 2 : 256;
                f = xrealloc(f, cf * sizeof(*f));
            }
            struct flat *x = &f[nf++];
            memset(x, 0, sizeof(*x));
            x->name = s->name;
            x->labels = labels_text(s);
            x->kind = s->kind;
            x->value = __atomic_load_n(&s->value, __ATOMIC_RELAXED);
            for (int b = 0; b < METRICS_BUCKETS; b++)
                x->hist.bucket[b] = __atomic_load_n(&s->hist.bucket[b], __ATOMIC_RELAXED);
            x->hist.count = __atomic_load_n(&s->hist.count, __ATOMIC_RELAXED);
            x->hist.sum_us = __atomic_load_n(&s->hist.sum_us, __ATOMIC_RELAXED);
        }
        pthread_mutex_unlock(&m->lock);
    }
    /* Names point into the tables: render before letting the registry go
     * (a worker that stops unregisters under this lock). */
    if (nf)
        qsort(f, nf, sizeof(*f), flat_order);
    size_t cap = 4096;
    char *b = xmalloc(cap);
    *len = 0;
    b[0] = 0;
    const char *last = NULL;
    for (size_t i = 0; i < nf;) {
        /* sum the same series from every table */
        size_t j = i + 1;
        while (j < nf && strcmp(f[j].name, f[i].name) == 0 && strcmp(f[j].labels, f[i].labels) == 0) {
            f[i].value += f[j].value;
            for (int k = 0; k < METRICS_BUCKETS; k++)
                f[i].hist.bucket[k] += f[j].hist.bucket[k];
            f[i].hist.count += f[j].hist.count;
            f[i].hist.sum_us += f[j].hist.sum_us;
            j++;
        }
        struct flat *x = &f[i];
        if (!last || strcmp(last, x->name) != 0) {
            const char *h = help_of(x->name);
            metrics_printf(&b, len, &cap, "# HELP %s %s\n# TYPE %s %s\n", x->name,
                           h ? h : "Portico metric.", x->name,
                           x->kind == METRIC_HISTOGRAM ? "histogram" : "counter");
            last = x->name;
        }
        const char *sep = x->labels[0] ? "," : "";
        if (x->kind == METRIC_COUNTER) {
            metrics_printf(&b, len, &cap, "%s%s%s%s %llu\n", x->name, x->labels[0] ? "{" : "",
                           x->labels, x->labels[0] ? "}" : "", (unsigned long long)x->value);
        } else {
            uint64_t cum = 0;
            for (int k = 0; k < METRICS_BUCKETS; k++) {
                cum += x->hist.bucket[k];
                if (k < METRICS_BUCKETS - 1)
                    metrics_printf(&b, len, &cap, "%s_bucket{%s%sle=\"%g\"} %llu\n", x->name,
                                   x->labels, sep, (double)bucket_us[k] / 1e6,
                                   (unsigned long long)cum);
                else
                    metrics_printf(&b, len, &cap, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", x->name,
                                   x->labels, sep, (unsigned long long)cum);
            }
            metrics_printf(&b, len, &cap, "%s_sum%s%s%s %.6f\n", x->name, x->labels[0] ? "{" : "",
                           x->labels, x->labels[0] ? "}" : "", (double)x->hist.sum_us / 1e6);
            metrics_printf(&b, len, &cap, "%s_count%s%s%s %llu\n", x->name,
                           x->labels[0] ? "{" : "", x->labels, x->labels[0] ? "}" : "",
                           (unsigned long long)x->hist.count);
        }
        i = j;
    }
    pthread_mutex_unlock(&registry_lock);
    for (size_t i = 0; i < nf; i++)
        free(f[i].labels);
    free(f);
    if (extra)
        extra(arg, &b, len, &cap);
    return b;
}

uint64_t metrics_sum(const char *name, const char *k1, const char *v1, const char *k2,
                     const char *v2)
{
    uint64_t sum = 0;
    pthread_once(&shared_once, shared_init);
    pthread_mutex_lock(&registry_lock);
    for (size_t r = 0; r < nregistry; r++) {
        struct metrics *m = registry[r];
        pthread_mutex_lock(&m->lock);
        for (size_t i = 0; i < m->cap; i++) {
            const struct metric_series *s = m->slot[i];
            if (!s || s->kind != METRIC_COUNTER || strcmp(s->name, name) != 0)
                continue;
            int ok = 1;
            const char *want_k[2] = { k1, k2 }, *want_v[2] = { v1, v2 };
            for (int w = 0; w < 2 && ok && want_k[w]; w++) {
                int found = 0;
                for (int j = 0; j < 3 && s->k[j] && !found; j++)
                    found = strcmp(s->k[j], want_k[w]) == 0 && strcmp(s->v[j], want_v[w]) == 0;
                ok = found;
            }
            if (ok)
                sum += __atomic_load_n(&s->value, __ATOMIC_RELAXED);
        }
        pthread_mutex_unlock(&m->lock);
    }
    pthread_mutex_unlock(&registry_lock);
    return sum;
}
