/* The upstream resilience keys: balance, hash_on, endpoint weights,
 * retry, circuit_breaker, health_check, max_requests, max_pending.
 * Every key is checked here, with its JSON path, before anything is
 * shared; resil_upstream_build then attaches the process-wide state. */
#include "config.h"
#include "config_internal.h"
#include "resil.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DAY_MS 86400000LL

static const char *jtype(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

static void __attribute__((format(printf, 3, 4)))
err_at(struct load *ld, const char *key, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    config_push_key(ld, key);
    config_err(ld, "%s", msg);
    config_pop(ld);
}

/* Unknown keys of obj (not in known) are problems. */
static void only_keys(struct load *ld, json_t *obj, const char *const *known, const char *example)
{
    const char *key;
    json_t *v;
    json_object_foreach (obj, key, v) {
        const char *const *k;
        for (k = known; *k && strcmp(*k, key) != 0; k++)
            ;
        if (!*k) {
            config_push_key(ld, key);
            config_err(ld, "unknown key (known here: %s)", example);
            config_pop(ld);
        }
    }
}

static void int_key(struct load *ld, json_t *obj, const char *key, long long min, long long max,
                    int *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return;
    config_push_key(ld, key);
    if (!json_is_integer(v))
        config_err(ld, "expected an integer, got %s", jtype(v));
    else if (json_integer_value(v) < min || json_integer_value(v) > max)
        config_err(ld, "must be from %lld to %lld, got %lld", min, max,
                   (long long)json_integer_value(v));
    else
        *out = (int)json_integer_value(v);
    config_pop(ld);
}

static void bool_key(struct load *ld, json_t *obj, const char *key, int *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return;
    if (!json_is_boolean(v))
        err_at(ld, key, "expected true or false, got %s", jtype(v));
    else
        *out = json_is_true(v);
}

/* A status code or class: 503, "503", "5xx". */
static int status_entry(struct load *ld, json_t *v, uint8_t *set)
{
    if (json_is_integer(v) && json_integer_value(v) >= 100 && json_integer_value(v) <= 699) {
        resil_status_add(set, (int)json_integer_value(v));
        return 0;
    }
    const char *s = json_is_string(v) ? json_string_value(v) : NULL;
    if (s && strlen(s) == 3 && s[0] >= '1' && s[0] <= '6' && strcmp(s + 1, "xx") == 0) {
        for (int k = 0; k < 100; k++)
            resil_status_add(set, (s[0] - '0') * 100 + k);
        return 0;
    }
    if (s && strlen(s) == 3 && s[0] >= '1' && s[0] <= '6' && s[1] >= '0' && s[1] <= '9' &&
        s[2] >= '0' && s[2] <= '9') {
        resil_status_add(set, atoi(s));
        return 0;
    }
    char shown[CONFIG_SHOW_BUF];
    config_err(ld, "expected a status code like \"503\" or a class like \"5xx\", got %s",
               s ? config_show(ld, v, shown, sizeof(shown)) : jtype(v));
    return -1;
}

static void status_list(struct load *ld, json_t *obj, const char *key, uint8_t *set)
{
    json_t *arr = json_object_get(obj, key);
    if (!arr)
        return;
    config_push_key(ld, key);
    if (!json_is_array(arr)) {
        config_err(ld, "expected an array like [\"503\", \"5xx\"], got %s", jtype(arr));
    } else {
        memset(set, 0, 75);
        for (size_t i = 0; i < json_array_size(arr); i++) {
            config_push_index(ld, i);
            status_entry(ld, json_array_get(arr, i), set);
            config_pop(ld);
        }
    }
    config_pop(ld);
}

json_t *config_endpoint_address(struct load *ld, json_t *v)
{
    if (!json_is_object(v))
        return v;
    static const char *const known[] = { "address", "weight", NULL };
    only_keys(ld, v, known, "address, weight");
    json_t *a = json_object_get(v, "address");
    if (!a || !json_is_string(a)) {
        config_err(ld, "an endpoint object needs \"address\": \"host:port\"");
        return NULL;
    }
    int w = 1;
    int_key(ld, v, "weight", 1, BALANCE_MAX_WEIGHT, &w);
    return a;
}

static void parse_retry(struct load *ld, json_t *obj, struct resil_retry *rt)
{
    static const char *const known[] = { "attempts",
                                         "on",
                                         "per_try_timeout_ms",
                                         "backoff_ms",
                                         "max_backoff_ms",
                                         "retry_non_idempotent",
                                         "max_replay_body_bytes",
                                         "budget_percent",
                                         "min_retries_per_second",
                                         NULL };
    rt->attempts = 2;
    rt->on = RETRY_ON_CONNECT | RETRY_ON_RESET;
    if (!json_is_object(obj)) {
        config_err(
            ld, "expected an object like {\"attempts\": 2, \"on\": [\"connect_failure\"]}, got %s",
            jtype(obj));
        return;
    }
    only_keys(ld, obj, known,
              "attempts, on, per_try_timeout_ms, backoff_ms, max_backoff_ms, retry_non_idempotent, "
              "max_replay_body_bytes, budget_percent, min_retries_per_second");
    int_key(ld, obj, "attempts", 1, 10, &rt->attempts);
    int_key(ld, obj, "per_try_timeout_ms", 1, DAY_MS, &rt->per_try_timeout_ms);
    int_key(ld, obj, "backoff_ms", 0, 60000, &rt->backoff_ms);
    int_key(ld, obj, "max_backoff_ms", 0, 600000, &rt->max_backoff_ms);
    bool_key(ld, obj, "retry_non_idempotent", &rt->non_idempotent);
    int_key(ld, obj, "max_replay_body_bytes", 0, 16 << 20, &rt->max_replay_body_bytes);
    int_key(ld, obj, "budget_percent", 0, 100, &rt->budget_percent);
    int_key(ld, obj, "min_retries_per_second", 0, 100000, &rt->min_retries_per_second);
    if (rt->max_backoff_ms < rt->backoff_ms)
        rt->max_backoff_ms = rt->backoff_ms;
    json_t *on = json_object_get(obj, "on");
    if (!on)
        return;
    config_push_key(ld, "on");
    if (!json_is_array(on)) {
        config_err(ld, "expected an array like [\"connect_failure\", \"reset\", \"503\"], got %s",
                   jtype(on));
    } else {
        rt->on = 0;
        for (size_t i = 0; i < json_array_size(on); i++) {
            json_t *v = json_array_get(on, i);
            const char *s = json_is_string(v) ? json_string_value(v) : "";
            config_push_index(ld, i);
            if (strcmp(s, "connect_failure") == 0)
                rt->on |= RETRY_ON_CONNECT;
            else if (strcmp(s, "reset") == 0)
                rt->on |= RETRY_ON_RESET;
            else if (strcmp(s, "timeout") == 0)
                rt->on |= RETRY_ON_TIMEOUT;
            else if (json_is_integer(v) || (s[0] >= '1' && s[0] <= '6'))
                status_entry(ld, v, rt->on_status);
            else {
                char shown[CONFIG_SHOW_BUF];
                config_err(ld,
                           "expected \"connect_failure\", \"reset\", \"timeout\" or a status "
                           "like \"503\", got %s",
                           json_is_string(v) ? config_show(ld, v, shown, sizeof(shown)) : jtype(v));
            }
            config_pop(ld);
        }
    }
    config_pop(ld);
}

static void parse_breaker(struct load *ld, json_t *obj, struct resil_upstream *ru)
{
    static const char *const known[] = { "consecutive_failures",
                                         "failure_percent",
                                         "min_requests",
                                         "window_ms",
                                         "open_ms",
                                         "max_open_ms",
                                         "half_open_requests",
                                         "max_ejected_percent",
                                         "failure_statuses",
                                         NULL };
    struct breaker_policy *p = &ru->breaker;
    if (!json_is_object(obj)) {
        config_err(
            ld, "expected an object like {\"consecutive_failures\": 5, \"open_ms\": 10000}, got %s",
            jtype(obj));
        return;
    }
    p->enabled = 1;
    only_keys(ld, obj, known,
              "consecutive_failures, failure_percent, min_requests, window_ms, open_ms, "
              "max_open_ms, half_open_requests, max_ejected_percent, failure_statuses");
    int_key(ld, obj, "consecutive_failures", 1, 1000000, &p->consecutive_failures);
    int_key(ld, obj, "failure_percent", 0, 100, &p->failure_percent);
    int_key(ld, obj, "min_requests", 1, 1000000, &p->min_requests);
    int_key(ld, obj, "window_ms", 100, DAY_MS, &p->window_ms);
    int_key(ld, obj, "open_ms", 1, DAY_MS, &p->open_ms);
    int_key(ld, obj, "max_open_ms", 1, DAY_MS, &p->max_open_ms);
    int_key(ld, obj, "half_open_requests", 1, 1000, &p->half_open_requests);
    int_key(ld, obj, "max_ejected_percent", 0, 100, &p->max_ejected_percent);
    if (p->max_open_ms < p->open_ms)
        p->max_open_ms = p->open_ms;
    status_list(ld, obj, "failure_statuses", ru->failure_status);
}

static void parse_health(struct load *ld, json_t *obj, struct resil_health *h)
{
    static const char *const known[] = { "path",
                                         "host",
                                         "expected_statuses",
                                         "interval_ms",
                                         "timeout_ms",
                                         "healthy_threshold",
                                         "unhealthy_threshold",
                                         NULL };
    if (!json_is_object(obj)) {
        config_err(
            ld, "expected an object like {\"path\": \"/healthz\", \"interval_ms\": 2000}, got %s",
            jtype(obj));
        return;
    }
    h->enabled = 1;
    only_keys(ld, obj, known,
              "path, host, expected_statuses, interval_ms, timeout_ms, healthy_threshold, "
              "unhealthy_threshold");
    json_t *p = json_object_get(obj, "path");
    if (p) {
        const char *s = json_is_string(p) ? json_string_value(p) : NULL;
        int ok = s && s[0] == '/';
        for (const char *q = s; ok && *q; q++)
            ok = (unsigned char)*q > 0x20 && *q != 0x7f;
        if (!ok)
            err_at(ld, "path", "expected a path like \"/healthz\" (no spaces or control bytes)");
        else {
            free(h->path);
            h->path = xstrdup(s);
        }
    }
    json_t *host = json_object_get(obj, "host");
    if (host) {
        const char *s = json_is_string(host) ? json_string_value(host) : NULL;
        int ok = s && *s;
        for (const char *q = s; ok && *q; q++)
            ok = (unsigned char)*q > 0x20 && *q != 0x7f;
        if (!ok)
            err_at(ld, "host", "expected a host name like \"users.internal\"");
        else
            h->host = xstrdup(s);
    }
    status_list(ld, obj, "expected_statuses", h->statuses);
    int_key(ld, obj, "interval_ms", 10, DAY_MS, &h->interval_ms);
    int_key(ld, obj, "timeout_ms", 1, DAY_MS, &h->timeout_ms);
    int_key(ld, obj, "healthy_threshold", 1, 1000, &h->healthy_threshold);
    int_key(ld, obj, "unhealthy_threshold", 1, 1000, &h->unhealthy_threshold);
}

int config_endpoint_name(struct load *ld, json_t *v, struct config_endpoint *e)
{
    char shown[CONFIG_SHOW_BUF];
    const char *s = json_string_value(v);
    const char *colon = strrchr(s, ':');
    size_t hl = colon ? (size_t)(colon - s) : 0;
    int ok = colon && hl > 0 && hl <= 253;
    for (size_t i = 0; ok && i < hl; i++)
        ok = (s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
             (s[i] >= '0' && s[i] <= '9') || s[i] == '.' || s[i] == '-' || s[i] == '_';
    long port = 0;
    if (ok) {
        char *end;
        port = strtol(colon + 1, &end, 10);
        ok = colon[1] && !*end && port >= 1 && port <= 65535;
    }
    if (!ok) {
        config_err(ld, "%s: expected \"host:port\" or \"IP:port\" (like \"users.internal:8000\")",
                   config_show(ld, v, shown, sizeof(shown)));
        return -1;
    }
    memset(e, 0, sizeof(*e));
    e->address = xstrdup(s);
    e->dns_host = xmalloc(hl + 1);
    memcpy(e->dns_host, s, hl);
    e->dns_host[hl] = '\0';
    e->dns_port = (int)port;
    return 0;
}

static void parse_dns(struct load *ld, json_t *obj, struct resil_dns *d)
{
    static const char *const known[] = { "refresh_ms", "max_addresses", "hosts_file", "nameserver",
                                         NULL };
    if (!json_is_object(obj)) {
        config_err(ld, "expected an object like {\"refresh_ms\": 5000}, got %s", jtype(obj));
        return;
    }
    only_keys(ld, obj, known, "refresh_ms, max_addresses, hosts_file, nameserver");
    int_key(ld, obj, "refresh_ms", 100, DAY_MS, &d->refresh_ms);
    int_key(ld, obj, "max_addresses", 1, 64, &d->max_addresses);
    json_t *h = json_object_get(obj, "hosts_file");
    if (h && (!json_is_string(h) || !*json_string_value(h)))
        err_at(ld, "hosts_file", "expected a file path, got %s", jtype(h));
    else if (h)
        d->hosts_file = xstrdup(json_string_value(h));
    json_t *n = json_object_get(obj, "nameserver");
    if (n && (!json_is_string(n) || !*json_string_value(n)))
        err_at(ld, "nameserver",
               "expected an address like \"10.0.0.2\" or \"127.0.0.1:5353\", got %s", jtype(n));
    else if (n)
        d->nameserver = xstrdup(json_string_value(n));
}

/* Each host name endpoint becomes dns.max_addresses slots, named
 * "host:port#k", with the weight of the entry. */
static void expand_names(struct config_upstream *u, struct resil_upstream *ru)
{
    size_t n = 0, slots = (size_t)ru->dns.max_addresses;
    for (size_t i = 0; i < u->nendpoints; i++)
        n += u->endpoints[i].dns_host ? slots : 1;
    if (n == u->nendpoints)
        return;
    struct config_endpoint *eps = xcalloc(n, sizeof(*eps));
    int *w = xcalloc(n, sizeof(*w));
    size_t k = 0;
    for (size_t i = 0; i < u->nendpoints; i++) {
        struct config_endpoint *e = &u->endpoints[i];
        if (!e->dns_host) {
            w[k] = ru->weights[i];
            eps[k++] = *e;
            continue;
        }
        for (size_t j = 0; j < slots; j++) {
            size_t len = strlen(e->address) + 8;
            eps[k].address = xmalloc(len);
            snprintf(eps[k].address, len, "%s#%zu", e->address, j);
            eps[k].dns_host = xstrdup(e->dns_host);
            eps[k].dns_port = e->dns_port;
            eps[k].dns_slot = (int)j;
            w[k++] = ru->weights[i];
        }
        free(e->address);
        free(e->dns_host);
    }
    free(u->endpoints);
    free(ru->weights);
    u->endpoints = eps;
    u->nendpoints = n;
    ru->weights = w;
}

void config_parse_resilience(struct load *ld, json_t *obj, struct config_upstream *u)
{
    struct resil_upstream *ru = xcalloc(1, sizeof(*ru));
    u->resil = ru;
    ru->retry = (struct resil_retry){
        .attempts = 1,
        .backoff_ms = 25,
        .max_backoff_ms = 250,
        .max_replay_body_bytes = 65536,
        .budget_percent = 20,
        .min_retries_per_second = 3,
    };
    ru->breaker = (struct breaker_policy){
        .enabled = 0,
        .consecutive_failures = 5,
        .min_requests = 10,
        .window_ms = 10000,
        .open_ms = 10000,
        .max_open_ms = 300000,
        .half_open_requests = 1,
        .max_ejected_percent = 100,
    };
    for (int s = 502; s <= 504; s++)
        resil_status_add(ru->failure_status, s);
    ru->health = (struct resil_health){
        .interval_ms = 2000,
        .timeout_ms = 1000,
        .healthy_threshold = 2,
        .unhealthy_threshold = 2,
    };
    ru->health.path = xstrdup("/healthz");
    for (int s = 200; s <= 399; s++)
        resil_status_add(ru->health.statuses, s);

    char shown[CONFIG_SHOW_BUF];
    json_t *b = json_object_get(obj, "balance");
    if (b) {
        const char *s = json_is_string(b) ? json_string_value(b) : "";
        if (strcmp(s, "round_robin") == 0)
            ru->balance = BAL_ROUND_ROBIN;
        else if (strcmp(s, "least_request") == 0)
            ru->balance = BAL_LEAST_REQUEST;
        else if (strcmp(s, "random") == 0)
            ru->balance = BAL_RANDOM;
        else if (strcmp(s, "hash") == 0)
            ru->balance = BAL_HASH;
        else
            err_at(ld, "balance",
                   "expected \"round_robin\", \"least_request\", \"random\" or \"hash\", got %s",
                   json_is_string(b) ? config_show(ld, b, shown, sizeof(shown)) : jtype(b));
    }
    json_t *h = json_object_get(obj, "hash_on");
    if (h) {
        const char *s = json_is_string(h) ? json_string_value(h) : "";
        if (ru->balance != BAL_HASH)
            err_at(ld, "hash_on", "only with \"balance\": \"hash\"");
        else if (strncmp(s, "header:", 7) == 0 && s[7]) {
            ru->hash_on = HASH_HEADER;
            ru->hash_name = xstrdup(s + 7);
        } else if (strncmp(s, "cookie:", 7) == 0 && s[7]) {
            ru->hash_on = HASH_COOKIE;
            ru->hash_name = xstrdup(s + 7);
        } else if (strcmp(s, "client_address") == 0) {
            ru->hash_on = HASH_CLIENT_ADDRESS;
        } else
            err_at(ld, "hash_on",
                   "expected \"header:NAME\", \"cookie:NAME\" or \"client_address\", got %s",
                   json_is_string(h) ? config_show(ld, h, shown, sizeof(shown)) : jtype(h));
    } else if (ru->balance == BAL_HASH) {
        ru->hash_on = HASH_CLIENT_ADDRESS;
    }
    json_t *v;
    if ((v = json_object_get(obj, "retry"))) {
        config_push_key(ld, "retry");
        parse_retry(ld, v, &ru->retry);
        config_pop(ld);
    }
    if ((v = json_object_get(obj, "circuit_breaker"))) {
        config_push_key(ld, "circuit_breaker");
        parse_breaker(ld, v, ru);
        config_pop(ld);
    }
    if ((v = json_object_get(obj, "health_check"))) {
        config_push_key(ld, "health_check");
        parse_health(ld, v, &ru->health);
        config_pop(ld);
    }
    ru->dns.refresh_ms = 5000;
    ru->dns.max_addresses = 8;
    if ((v = json_object_get(obj, "dns"))) {
        config_push_key(ld, "dns");
        parse_dns(ld, v, &ru->dns);
        config_pop(ld);
    }
    int_key(ld, obj, "max_requests", 0, 100000000, &ru->max_requests);
    int_key(ld, obj, "max_pending", 0, 100000000, &ru->max_pending);

    /* Weights, by position; entries with problems were recorded already. */
    ru->weights = xcalloc(u->nendpoints ? u->nendpoints : 1, sizeof(*ru->weights));
    json_t *arr = json_object_get(obj, "endpoints");
    for (size_t i = 0; i < u->nendpoints; i++) {
        json_t *e = json_is_array(arr) && json_array_size(arr) == u->nendpoints
                        ? json_array_get(arr, i)
                        : NULL;
        json_t *w = json_is_object(e) ? json_object_get(e, "weight") : NULL;
        ru->weights[i] = json_is_integer(w) && json_integer_value(w) >= 1 &&
                                 json_integer_value(w) <= BALANCE_MAX_WEIGHT
                             ? (int)json_integer_value(w)
                             : 1;
    }
    expand_names(u, ru);
    if (u->nendpoints > 60000) {
        err_at(ld, "endpoints", "too many endpoints");
        return;
    }
    resil_upstream_build(u);
}
