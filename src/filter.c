/* The filter chain runner and the module API (module.h) on top of the
 * request. The chain of a request is the global filters followed by its
 * route's; everything here allocates from the request's arena. */
#include "conn.h"
#include "log.h"
#include "metrics.h"
#include "worker.h"

#include <arpa/inet.h>
#include <string.h>
#include <strings.h>

static struct conn *conn_of(const struct request *r) { return r->conn; }

/* ---- the chain ---------------------------------------------------------- */

void filter_chain_setup(struct conn *c)
{
    struct request *r = &c->req;
    const struct config *cfg = c->ps->cfg;
    size_t nroute = r->route ? r->route->nfilters : 0;
    r->nchain = cfg->nfilters + nroute;
    if (!r->nchain)
        return;
    r->chain = arena_calloc(&c->arena, r->nchain * sizeof(*r->chain));
    for (size_t i = 0; i < cfg->nfilters; i++)
        r->chain[i].f = &cfg->filters[i];
    for (size_t i = 0; i < nroute; i++)
        r->chain[cfg->nfilters + i].f = &r->route->filters[i];
    for (size_t i = 0; i < r->nchain; i++)
        if (r->chain[i].f->m->on_request_body)
            r->body_hooks = 1;
}

/* Run on_request from chain_pos on. A filter that pauses is resumed by
 * calling this again (conn.c does, after request_resume). */
enum filter_status filter_run_request(struct conn *c)
{
    struct request *r = &c->req;
    while (r->chain_pos < r->nchain) {
        struct filter_run *fr = &r->chain[r->chain_pos];
        const struct module *m = fr->f->m;
        r->chain_pos++;
        r->chain_logged = r->chain_pos;
        if (!m->on_request) {
            r->chain_ok = r->chain_pos;
            continue;
        }
        enum filter_status st = m->on_request(r, fr->f->cfg, &fr->ctx);
        if (st == FILTER_PAUSED)
            return st;
        if (st == FILTER_RESPONDED) {
            if (!r->local.set) {
                log_error("module %s returned FILTER_RESPONDED without answering: 500", m->name);
                conn_local_answer(c, 500, NULL, NULL, 0, NULL);
            }
            return st;
        }
        r->chain_ok = r->chain_pos;
    }
    return FILTER_CONTINUE;
}

/* The paused filter let the request through: count it as passed. */
static void chain_resumed(struct request *r) { r->chain_ok = r->chain_pos; }

void filter_run_response(struct conn *c)
{
    struct request *r = &c->req;
    if (r->response_hooks_done)
        return;
    r->response_hooks_done = 1;
    r->deferring = 1;
    for (size_t i = r->chain_ok; i-- > 0;) {
        struct filter_run *fr = &r->chain[i];
        if (fr->f->m->on_response)
            fr->f->m->on_response(r, fr->f->cfg, &fr->ctx);
    }
    r->deferring = 0;
}

enum filter_status filter_run_body(struct conn *c, const char *data, size_t len)
{
    struct request *r = &c->req;
    r->deferring = 1;
    enum filter_status st = FILTER_CONTINUE;
    for (size_t i = 0; i < r->chain_ok && st == FILTER_CONTINUE; i++) {
        struct filter_run *fr = &r->chain[i];
        if (fr->f->m->on_request_body)
            st = fr->f->m->on_request_body(r, fr->f->cfg, &fr->ctx, data, len);
    }
    r->deferring = 0;
    return st == FILTER_RESPONDED && r->local.set ? FILTER_RESPONDED : FILTER_CONTINUE;
}

void filter_run_log(struct conn *c)
{
    struct request *r = &c->req;
    for (size_t i = 0; i < r->chain_logged; i++) {
        struct filter_run *fr = &r->chain[i];
        if (fr->f->m->on_log)
            fr->f->m->on_log(r, fr->f->cfg, &fr->ctx);
    }
    r->chain_logged = 0;
}

/* ---- header edits ------------------------------------------------------- */

static int same_name(const struct header_edit *e, const char *name, size_t len)
{
    return e->name_len == len && strncasecmp(e->name, name, len) == 0;
}

int filter_edits_drop(const struct header_edit *list, const char *name, size_t len)
{
    for (const struct header_edit *e = list; e; e = e->next)
        if (e->op != EDIT_ADD && same_name(e, name, len))
            return 1;
    return 0;
}

void filter_edits_emit(const struct header_edit *list, struct buf *out)
{
    for (const struct header_edit *e = list; e; e = e->next) {
        if (e->op == EDIT_REMOVE)
            continue;
        /* a later set or remove of the same name overrides this one */
        if (filter_edits_drop(e->next, e->name, e->name_len))
            continue;
        if (!buf_can_append(out, e->name_len + e->value_len + 4))
            continue; /* bounded: never overflow the head buffer */
        buf_append(out, e->name, e->name_len);
        buf_append(out, ": ", 2);
        buf_append(out, e->value, e->value_len);
        buf_append(out, "\r\n", 2);
    }
}

/* RFC 9110 tchar, as a table: modules set headers on every request. */
static const unsigned char tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1,
    ['+'] = 1, ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1,
    ['~'] = 1, ['0' ... '9'] = 1, ['A' ... 'Z'] = 1, ['a' ... 'z'] = 1,
};

static int is_tchar(unsigned char ch) { return tchar[ch]; }

static int valid_name(const char *n)
{
    if (!n || !*n)
        return 0;
    for (const unsigned char *p = (const unsigned char *)n; *p; p++)
        if (!is_tchar(*p))
            return 0;
    /* the proxy owns framing and connection management */
    size_t len = strlen(n);
    return !proxy_is_hop_by_hop(n, len) && !(len == 4 && strncasecmp(n, "host", 4) == 0);
}

/* The length of a valid field value, or -1 (CR, LF, NUL or another
 * control character but HTAB). One table lookup per byte. */
static const unsigned char value_bad[256] = {
    [0 ... 8] = 1, [10 ... 31] = 1, [127] = 1,
};

static ssize_t valid_value_len(const char *v)
{
    if (!v)
        return -1;
    const unsigned char *p = (const unsigned char *)v;
    for (; !value_bad[*p]; p++)
        ;
    return *p ? -1 : (ssize_t)(p - (const unsigned char *)v);
}

/* One arena block holds the edit, its name and its value. */
static int edit_add(struct request *r, struct header_edit ***tail, enum edit_op op,
                    const char *name, const char *value)
{
    ssize_t vlen = 0;
    if (!valid_name(name) || (op != EDIT_REMOVE && (vlen = valid_value_len(value)) < 0))
        return -1;
    size_t nlen = strlen(name);
    struct header_edit *e = arena_alloc(r->arena, sizeof(*e) + nlen + 1 + (size_t)vlen + 1);
    char *text = (char *)(e + 1);
    memcpy(text, name, nlen + 1);
    *e = (struct header_edit){ .op = op, .name = text, .name_len = nlen };
    if (op != EDIT_REMOVE) {
        e->value = text + nlen + 1;
        e->value_len = (size_t)vlen;
        memcpy(text + nlen + 1, value, (size_t)vlen + 1);
    }
    **tail = e;
    *tail = &e->next;
    return 0;
}

static struct header_edit ***req_tail(struct request *r)
{
    if (!r->req_edits_tail)
        r->req_edits_tail = &r->req_edits;
    return &r->req_edits_tail;
}

static struct header_edit ***resp_tail(struct request *r)
{
    if (!r->resp_edits_tail)
        r->resp_edits_tail = &r->resp_edits;
    return &r->resp_edits_tail;
}

int request_set_header(struct request *r, const char *n, const char *v) { return edit_add(r, req_tail(r), EDIT_SET, n, v); }
int request_add_header(struct request *r, const char *n, const char *v) { return edit_add(r, req_tail(r), EDIT_ADD, n, v); }
void request_remove_header(struct request *r, const char *n) { edit_add(r, req_tail(r), EDIT_REMOVE, n, NULL); }
int response_set_header(struct request *r, const char *n, const char *v) { return edit_add(r, resp_tail(r), EDIT_SET, n, v); }
int response_add_header(struct request *r, const char *n, const char *v) { return edit_add(r, resp_tail(r), EDIT_ADD, n, v); }
void response_remove_header(struct request *r, const char *n) { edit_add(r, resp_tail(r), EDIT_REMOVE, n, NULL); }

/* ---- reading the request ------------------------------------------------ */

const char *request_method(const struct request *r) { return r->method; }
const char *request_host(const struct request *r) { return r->host; }
const char *request_route_name(const struct request *r) { return r->route ? r->route->name : NULL; }
int request_is_tls(const struct request *r) { return r->conn->ssl != NULL; }

const char *request_path(const struct request *r, size_t *len)
{
    if (len)
        *len = r->path_len;
    return r->path;
}

const char *request_query(const struct request *r, size_t *len)
{
    if (len)
        *len = r->query_len;
    return r->query;
}

static const char *find_field(const struct http_header *h, size_t n, const char *name, size_t *len)
{
    size_t nl = strlen(name);
    for (size_t i = 0; i < n; i++) {
        if (h[i].name.len == nl && strncasecmp(h[i].name.p, name, nl) == 0) {
            if (len)
                *len = h[i].value.len;
            return h[i].value.p;
        }
    }
    return NULL;
}

/* The head's spans are valid while on_request runs (the head is still in
 * c->in); later, the upstream head has been written and the request's own
 * head is gone, so only on_request may read request headers. */
const char *request_header(const struct request *r, const char *name, size_t *len)
{
    if (r->head_consumed)
        return NULL;
    return find_field(r->head.headers, r->head.nheaders, name, len);
}

size_t request_header_count(const struct request *r, const char *name)
{
    if (r->head_consumed)
        return 0;
    size_t nl = strlen(name), n = 0;
    for (size_t i = 0; i < r->head.nheaders; i++) {
        const struct http_header *h = &r->head.headers[i];
        n += h->name.len == nl && strncasecmp(h->name.p, name, nl) == 0;
    }
    return n;
}

int response_status(const struct request *r)
{
    if (r->local.set)
        return r->local.status;
    return r->resp.status ? r->resp.status : r->status;
}

int response_is_local(const struct request *r) { return r->local.set; }

const char *response_header(const struct request *r, const char *name, size_t *len)
{
    if (r->local.set || !r->resp.headers)
        return NULL;
    return find_field(r->resp.headers, r->resp.nheaders, name, len);
}

/* Right-most X-Forwarded-For address that is not a trusted proxy, when the
 * peer itself is trusted; else the peer. */
static void resolve_client(struct request *r)
{
    struct conn *c = conn_of(r);
    r->client_addr_set = 1;
    memcpy(&r->client_addr, &c->peer, sizeof(c->peer));
    _Static_assert(sizeof(c->peer_ip) <= sizeof(r->client_ip), "client_ip holds peer_ip");
    memcpy(r->client_ip, c->peer_ip, strlen(c->peer_ip) + 1);
    if (!c->trusted || r->head_consumed)
        return;
    const struct config *cfg = c->ps->cfg;
    /* Walk every X-Forwarded-For field from the last one backwards. */
    for (size_t i = r->head.nheaders; i-- > 0;) {
        const struct http_header *h = &r->head.headers[i];
        if (!(h->name.len == 15 && strncasecmp(h->name.p, "x-forwarded-for", 15) == 0))
            continue;
        const char *p = h->value.p, *end = p + h->value.len;
        while (end > p) {
            const char *s = end;
            while (s > p && s[-1] != ',')
                s--;
            const char *a = s, *b = end;
            while (a < b && (*a == ' ' || *a == '\t'))
                a++;
            while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
                b--;
            end = s > p ? s - 1 : p;
            char ip[48]; /* a valid address has at most 45 characters */
            size_t n = (size_t)(b - a);
            if (n == 0 || n >= sizeof(ip))
                return; /* garbage: stop at what we know */
            memcpy(ip, a, n);
            ip[n] = '\0';
            union peer_addr ss;
            memset(&ss, 0, sizeof(ss));
            if (inet_pton(AF_INET, ip, &ss.in.sin_addr) == 1)
                ss.in.sin_family = AF_INET;
            else if (inet_pton(AF_INET6, ip, &ss.in6.sin6_addr) == 1)
                ss.in6.sin6_family = AF_INET6;
            else
                return;
            r->client_addr = ss;
            snprintf(r->client_ip, sizeof(r->client_ip), "%s", ip);
            int trusted = 0;
            for (size_t k = 0; k < cfg->ntrusted_proxies; k++)
                if (cidr_match(&cfg->trusted_proxies[k], &ss.sa))
                    trusted = 1;
            if (!trusted)
                return;
        }
    }
}

const struct sockaddr *request_client_addr(const struct request *r)
{
    struct request *w = (struct request *)r;
    if (!r->client_addr_set)
        resolve_client(w);
    return (const struct sockaddr *)&r->client_addr;
}

const char *request_client_ip(const struct request *r)
{
    struct request *w = (struct request *)r;
    if (!r->client_addr_set)
        resolve_client(w);
    return r->client_ip;
}

/* ---- answering, resuming ------------------------------------------------ */

void request_respond(struct request *r, int status, const char *ctype, const char *body, size_t len)
{
    struct conn *c = conn_of(r);
    if (status < 200 || status > 599)
        status = 500;
    char *copy = NULL;
    if (len) {
        copy = arena_alloc(r->arena, len);
        memcpy(copy, body, len);
    }
    const char *ct = request_strdup(r, ctype ? ctype : "application/json");
    if (r->rs == RS_PAUSED && !r->deferring) {
        /* A paused request answered from a later callback. */
        conn_local_answer(c, status, ct, copy, len, NULL);
        conn_schedule(c);
        return;
    }
    /* Inside a hook: committed now (on_request) or when the hook returns. */
    conn_local_answer(c, status, ct, copy, len, NULL);
}

void request_resume(struct request *r)
{
    if (r->rs != RS_PAUSED)
        return;
    chain_resumed(r);
    r->resume_pending = 1;
    conn_schedule(conn_of(r));
}

/* ---- memory, log, variables --------------------------------------------- */

void *request_alloc(struct request *r, size_t n) { return arena_calloc(r->arena, n); }

char *request_strdup(struct request *r, const char *s)
{
    return arena_strndup(r->arena, s, strlen(s));
}

void request_cleanup_add(struct request *r, void (*fn)(void *), void *arg)
{
    arena_cleanup_add(r->arena, fn, arg);
}

/* A key/value pair and both strings in one arena block. */
static struct kv *kv_new(struct request *r, const char *key, const char *value)
{
    value = value ? value : "";
    size_t kl = strlen(key), vl = strlen(value);
    struct kv *f = arena_alloc(r->arena, sizeof(*f) + kl + vl + 2);
    char *k = (char *)(f + 1), *v = k + kl + 1;
    memcpy(k, key, kl + 1);
    memcpy(v, value, vl + 1);
    *f = (struct kv){ .key = k, .value = v };
    return f;
}

void request_log_field(struct request *r, const char *key, const char *value)
{
    if (conn_of(r)->w->log_fd < 0)
        return; /* no access log: nothing would read it */
    struct kv *f = kv_new(r, key, value);
    if (!r->log_fields_tail)
        r->log_fields_tail = &r->log_fields;
    *r->log_fields_tail = f;
    r->log_fields_tail = &f->next;
}

void request_var_set(struct request *r, const char *name, const char *value)
{
    for (struct kv *v = r->vars; v; v = v->next) {
        if (strcmp(v->key, name) == 0) {
            v->value = request_strdup(r, value ? value : "");
            return;
        }
    }
    struct kv *v = kv_new(r, name, value);
    v->next = r->vars;
    r->vars = v;
}

const char *request_var(const struct request *r, const char *name)
{
    for (const struct kv *v = r->vars; v; v = v->next)
        if (strcmp(v->key, name) == 0)
            return v->value;
    return NULL;
}

struct event_base *request_event_base(const struct request *r) { return conn_of(r)->w->base; }

/* Modules count per request with labels such as the route and an outcome:
 * finding the series from the strings was two thirds of a local rate
 * limit's cost. Each worker thread remembers the series it used, by the
 * argument pointers, checked against copies of the values (a pointer may
 * be reused for another value). Series live as long as their table. */
#define MM_CACHE 64
#define MM_VALUE 48
struct mm_entry {
    const struct metrics *m;
    const char *name, *k1, *k2, *v1p, *v2p;
    char v1[MM_VALUE], v2[MM_VALUE];
    struct metric_series *s;
};
static __thread struct mm_entry mm_cache[MM_CACHE];

static int mm_copy(char *dst, const char *v)
{
    size_t l = v ? strlen(v) : 0;
    if (l >= MM_VALUE)
        return -1;
    memcpy(dst, v ? v : "", l + 1);
    return 0;
}

void module_metric_add(const char *name, uint64_t n, const char *k1, const char *v1,
                       const char *k2, const char *v2)
{
    struct metrics *m = metrics_thread();
    if (!k1)
        k2 = NULL;
    if (m->shared) {
        metrics_add(m, name, n, k1, v1, k2, v2, NULL, NULL);
        return;
    }
    uintptr_t h = (uintptr_t)name ^ ((uintptr_t)v1 * 31) ^ ((uintptr_t)v2 * 131);
    struct mm_entry *e = &mm_cache[(h >> 4) % MM_CACHE];
    if (e->s && e->m == m && e->name == name && e->k1 == k1 && e->k2 == k2 && e->v1p == v1 &&
        e->v2p == v2 && strcmp(e->v1, v1 ? v1 : "") == 0 && strcmp(e->v2, v2 ? v2 : "") == 0) {
        metrics_series_add(e->s, n);
        return;
    }
    struct metric_series *s = metrics_counter(m, name, k1, v1, k2, v2, NULL, NULL);
    metrics_series_add(s, n);
    struct mm_entry fresh = { .m = m, .name = name, .k1 = k1, .k2 = k2, .v1p = v1, .v2p = v2, .s = s };
    if (mm_copy(fresh.v1, v1) == 0 && mm_copy(fresh.v2, v2) == 0)
        *e = fresh;
}
int request_worker_id(const struct request *r) { return conn_of(r)->w->id; }
