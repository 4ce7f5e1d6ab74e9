#define _GNU_SOURCE /* strcasestr */
/* Loading the configuration: parse (jansson), substitute ${VAR} and @file
 * values, validate every key while building the snapshot, then build the
 * router.
 *
 * The file is read in four passes:
 *   1. json_loads (syntax; jansson reports line and column),
 *   2. substitution over every string value (the walk here, each string
 *      in config_subst.c),
 *   3. validation, which fills struct config and records problems with
 *      the JSON path where they were found (all of them, not the first),
 *   4. when there were problems, a light scan of the raw text that finds
 *      the line of each problem's path or its nearest ancestor
 *      (config_lines.c).
 * Values that came from substitution may be secrets: a message quotes them
 * only as the template written in the file, never as their value. */
#include "config.h"
#include "accesslog.h"
#include "config_internal.h"

#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "resil.h"
#include "router.h"
#include "tls.h"
#include "uri.h"

#define MAX_ERRORS 100               /* further problems are counted, not listed */
#define MSG_MAX 1024                 /* longest message, with its value quoted */
#define CONFIG_FILE_MAX (16u << 20)
#define DAY_MS 86400000LL
#define SHOW_BUF (SHOW_MAX * 6 + 64)  /* room for a value SHOW_MAX long, escaped */

/* ------------------------------------------------------------------ */
/* The load context and error collection.                               */

struct problem {
    char *path;
    char *msg;
    size_t *cuts;     /* lengths of path and of each ancestor path (> 0) */
    int *lines;       /* per cut: line found by the scan, 0 = none */
    size_t ncuts;
};

struct subst_note {   /* a string value that substitution changed */
    const json_t *v;
    char *template;   /* the text written in the file */
};

struct load {
    struct config *cfg;
    char *dir;        /* config file's directory, NULL = relative to the cwd */
    struct sbuf path; /* JSON path of the value being looked at */
    size_t *marks;    /* path lengths at each nesting level */
    size_t nmarks, cmarks;
    struct problem *probs;
    size_t nprobs, cprobs, dropped;
    char **tainted;   /* paths whose substitution failed: no more errors there */
    size_t ntainted, ctainted;
    struct subst_note *notes;
    size_t nnotes, cnotes;
};

static void mark_push(struct load *ld)
{
    if (ld->nmarks == ld->cmarks) {
        ld->cmarks = ld->cmarks ? ld->cmarks * 2 : 16;
        ld->marks = xrealloc(ld->marks, ld->cmarks * sizeof(*ld->marks));
    }
    ld->marks[ld->nmarks++] = ld->path.len;
}

static void push_key(struct load *ld, const char *key)
{
    mark_push(ld);
    config_path_put_key(&ld->path, key, strlen(key));
}

static void push_index(struct load *ld, size_t i)
{
    mark_push(ld);
    config_path_put_index(&ld->path, i);
}

static void pop(struct load *ld)
{
    sb_truncate(&ld->path, ld->marks[--ld->nmarks]);
}

static int is_tainted(const struct load *ld)
{
    for (size_t i = 0; i < ld->ntainted; i++) {
        size_t n = strlen(ld->tainted[i]);
        if (ld->path.len >= n && memcmp(ld->path.p, ld->tainted[i], n) == 0 &&
            (ld->path.len == n || ld->path.p[n] == '.' || ld->path.p[n] == '['))
            return 1;
    }
    return 0;
}

/* Record a problem at the current path. */
static void __attribute__((format(printf, 2, 0))) verr(struct load *ld, const char *fmt, va_list ap)
{
    if (is_tainted(ld))
        return;
    if (ld->nprobs >= MAX_ERRORS) {
        ld->dropped++;
        return;
    }
    if (ld->nprobs == ld->cprobs) {
        ld->cprobs = ld->cprobs ? ld->cprobs * 2 : 8;
        ld->probs = xrealloc(ld->probs, ld->cprobs * sizeof(*ld->probs));
    }
    struct problem *p = &ld->probs[ld->nprobs++];
    char msg[MSG_MAX];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    p->msg = xstrdup(msg);
    p->path = xstrdup(ld->path.p ? ld->path.p : "");
    /* The path, then each non-empty ancestor path, longest first. */
    p->ncuts = 0;
    p->cuts = xcalloc(ld->nmarks + 1, sizeof(*p->cuts));
    p->lines = xcalloc(ld->nmarks + 1, sizeof(*p->lines));
    size_t last = ld->path.len;
    if (last)
        p->cuts[p->ncuts++] = last;
    for (size_t i = ld->nmarks; i-- > 0;) {
        if (ld->marks[i] > 0 && ld->marks[i] < last) {
            last = ld->marks[i];
            p->cuts[p->ncuts++] = last;
        }
    }
}

static void __attribute__((format(printf, 2, 3))) err(struct load *ld, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    verr(ld, fmt, ap);
    va_end(ap);
}

/* A problem with member key of the current object. */
static void __attribute__((format(printf, 3, 4)))
err_key(struct load *ld, const char *key, const char *fmt, ...)
{
    va_list ap;
    push_key(ld, key);
    va_start(ap, fmt);
    verr(ld, fmt, ap);
    va_end(ap);
    pop(ld);
}

static void taint_current(struct load *ld)
{
    if (ld->ntainted == ld->ctainted) {
        ld->ctainted = ld->ctainted ? ld->ctainted * 2 : 8;
        ld->tainted = xrealloc(ld->tainted, ld->ctainted * sizeof(*ld->tainted));
    }
    ld->tainted[ld->ntainted++] = xstrdup(ld->path.p ? ld->path.p : "");
}

static int note_cmp(const void *a, const void *b)
{
    const struct subst_note *x = a, *y = b;
    return x->v < y->v ? -1 : x->v > y->v;
}

static const struct subst_note *find_note(const struct load *ld, const json_t *v)
{
    struct subst_note key = { .v = v };
    return ld->nnotes ? bsearch(&key, ld->notes, ld->nnotes, sizeof(key), note_cmp) : NULL;
}

/* A string value for a message: "text", or for a substituted value the
 * template it came from (never the value: it may be a secret). */
static const char *show(const struct load *ld, const json_t *v, char *buf, size_t cap)
{
    struct sbuf b = { 0 };
    const struct subst_note *n = find_note(ld, v);
    const char *s = n ? n->template : json_string_value(v);
    size_t len = n ? strlen(s) : json_string_length(v);
    sb_putc(&b, '"');
    sb_put_escaped(&b, s ? s : "", s ? len : 0, SHOW_MAX);
    sb_putc(&b, '"');
    if (n)
        sb_puts(&b, " (after substitution)");
    snprintf(buf, cap, "%s", b.p);
    free(b.p);
    return buf;
}

/* ------------------------------------------------------------------ */
/* Pass 2: substitution of ${VAR}, ${VAR:-default}, $$ and @file.        */

/* Takes template (malloc'd). */
static void subst_note_add(struct load *ld, const json_t *v, char *template)
{
    if (ld->nnotes == ld->cnotes) {
        ld->cnotes = ld->cnotes ? ld->cnotes * 2 : 8;
        ld->notes = xrealloc(ld->notes, ld->cnotes * sizeof(*ld->notes));
    }
    ld->notes[ld->nnotes].v = v;
    ld->notes[ld->nnotes].template = template;
    ld->nnotes++;
}

/* A failure is recorded at the value's path, which is then tainted:
 * validation would only complain again about the unsubstituted text. */
static void subst_string(struct load *ld, json_t *v)
{
    char why[MSG_MAX], *template;
    int rc = config_subst_string(v, ld->dir, &template, why, sizeof(why));
    if (rc < 0) {
        err(ld, "%s", why);
        taint_current(ld);
    } else if (rc > 0) {
        subst_note_add(ld, v, template);
    }
}

static void subst_walk(struct load *ld, json_t *v)
{
    const char *key;
    json_t *child;
    size_t i;
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        json_object_foreach(v, key, child) {
            push_key(ld, key);
            subst_walk(ld, child);
            pop(ld);
        }
        break;
    case JSON_ARRAY:
        json_array_foreach(v, i, child) {
            push_index(ld, i);
            subst_walk(ld, child);
            pop(ld);
        }
        break;
    case JSON_STRING:
        subst_string(ld, v);
        break;
    default:
        break;
    }
}

/* ------------------------------------------------------------------ */
/* Pass 3 helpers: keys and typed getters.                              */

static const char *type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "object";
    case JSON_ARRAY: return "array";
    case JSON_STRING: return "string";
    case JSON_INTEGER: return "integer";
    case JSON_REAL: return "number with a fraction";
    case JSON_TRUE:
    case JSON_FALSE: return "boolean";
    default: return "null";
    }
}

static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b), row[65];
    if (la > 64 || lb > 64)
        return SIZE_MAX;
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static int in_list(const char *const *list, const char *s)
{
    for (; list && *list; list++)
        if (strcmp(*list, s) == 0)
            return 1;
    return 0;
}

/* Every key of obj must be in known; keys in later (DESIGN.md features not
 * built yet) get a message saying so instead of "unknown key". */
static void check_keys(struct load *ld, json_t *obj, const char *const *known, const char *const *later)
{
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        if (in_list(known, key))
            continue;
        if (in_list(later, key)) {
            err_key(ld, key, "not supported by this build yet");
            continue;
        }
        const char *near = NULL;
        size_t best = 3;
        for (const char *const *k = known; *k; k++) {
            size_t d = edit_distance(key, *k);
            if (d < best) {
                best = d;
                near = *k;
            }
        }
        if (near && best + 2 <= strlen(key))
            err_key(ld, key, "unknown key (did you mean \"%s\"?)", near);
        else
            err_key(ld, key, "unknown key");
    }
}

/* Typed member getters. Absent: *out = def and 0. Wrong type or range:
 * a problem is recorded, *out = def and -1. */
static int get_int(struct load *ld, json_t *obj, const char *key, long long min, long long max,
                   long long def, long long *out)
{
    json_t *v = json_object_get(obj, key);
    *out = def;
    if (!v)
        return 0;
    if (!json_is_integer(v)) {
        err_key(ld, key, "expected an integer, got %s", type_name(v));
        return -1;
    }
    long long n = json_integer_value(v);
    if (n < min || n > max) {
        if (max == LLONG_MAX)
            err_key(ld, key, "must be at least %lld, got %lld", min, n);
        else
            err_key(ld, key, "must be from %lld to %lld, got %lld", min, max, n);
        return -1;
    }
    *out = n;
    return 0;
}

static int get_int_field(struct load *ld, json_t *obj, const char *key, long long min,
                         long long max, int def, int *out)
{
    long long v;
    int rc = get_int(ld, obj, key, min, max, def, &v);
    *out = (int)v;
    return rc;
}

static int get_timeout(struct load *ld, json_t *obj, const char *key, int def, int *out)
{
    long long v;
    json_t *j = json_object_get(obj, key);
    *out = def;
    if (j && json_is_integer(j) && (json_integer_value(j) < 1 || json_integer_value(j) > DAY_MS)) {
        err_key(ld, key, "must be from 1 to %lld milliseconds (one day), got %lld", DAY_MS,
                (long long)json_integer_value(j));
        return -1;
    }
    int rc = get_int(ld, obj, key, 1, DAY_MS, def, &v);
    *out = (int)v;
    return rc;
}

static int get_bool(struct load *ld, json_t *obj, const char *key, int def, int *out)
{
    json_t *v = json_object_get(obj, key);
    *out = def;
    if (!v)
        return 0;
    if (!json_is_boolean(v)) {
        err_key(ld, key, "expected true or false, got %s", type_name(v));
        return -1;
    }
    *out = json_is_true(v);
    return 0;
}

/* A string member; NULL when absent or of the wrong type (then recorded). */
static json_t *get_string(struct load *ld, json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    if (v && !json_is_string(v)) {
        err_key(ld, key, "expected a string, got %s", type_name(v));
        return NULL;
    }
    return v;
}

/* An object or array member of the right type; NULL otherwise. */
static json_t *get_typed(struct load *ld, json_t *obj, const char *key, json_type t)
{
    json_t *v = json_object_get(obj, key);
    if (v && json_typeof(v) != t) {
        err_key(ld, key, "expected %s, got %s", t == JSON_OBJECT ? "an object" : "an array",
                type_name(v));
        return NULL;
    }
    return v;
}

static int has_ctl(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return 1;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Pass 3: the top-level sections.                                      */

static const char *const no_keys[] = { NULL };

long config_cpu_quota(const char *cpu_max)
{
    long long quota, period;
    if (sscanf(cpu_max, "%lld %lld", &quota, &period) != 2 || quota <= 0 || period <= 0)
        return 0; /* "max 100000": no limit */
    return (long)((quota + period - 1) / period);
}

/* The CPUs this process may use: those of its affinity mask (taskset,
 * cpusets), and no more than its cgroup's CPU quota (a container's CPU
 * limit), rounded up. */
static long usable_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
        n = CPU_COUNT(&set);
    FILE *f = fopen("/sys/fs/cgroup/cpu.max", "r"); /* cgroup v2 */
    if (f) {
        char line[64];
        if (fgets(line, sizeof(line), f)) {
            long q = config_cpu_quota(line);
            if (q > 0 && q < n)
                n = q;
        }
        fclose(f);
    }
    return n;
}

static void parse_workers(struct load *ld, json_t *root)
{
    long long w;
    get_int(ld, root, "workers", 0, 256, 0, &w);
    if (w == 0) {
        long n = usable_cpus();
        w = n < 1 ? 1 : n > 256 ? 256 : n;
    }
    ld->cfg->workers = (int)w;
    long long spin;
    get_int(ld, root, "busy_poll_us", 0, 1000, 0, &spin);
    ld->cfg->busy_poll_us = (unsigned)spin;
}

static void parse_log_level(struct load *ld, json_t *root)
{
    char shown[SHOW_BUF];
    json_t *v = get_string(ld, root, "log_level");
    int ok = v && log_level_parse(json_string_value(v)) >= 0;
    if (v && !ok)
        err_key(ld, "log_level", "%s is not one of \"debug\", \"info\", \"warn\", \"error\"",
                show(ld, v, shown, sizeof(shown)));
    ld->cfg->log_level = xstrdup(ok ? json_string_value(v) : "info");
}

static int sockaddr_cmp(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return a->ss_family < b->ss_family ? -1 : 1;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        int c = memcmp(&x->sin_addr, &y->sin_addr, sizeof(x->sin_addr));
        return c ? c : memcmp(&x->sin_port, &y->sin_port, sizeof(x->sin_port));
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    int c = memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr));
    return c ? c : memcmp(&x->sin6_port, &y->sin6_port, sizeof(x->sin6_port));
}

/* For sorting by address or by name while keeping config order in ties. */
struct sort_item {
    const struct sockaddr_storage *addr;
    const char *name;
    size_t index;
};

static int addr_item_order(const void *a, const void *b)
{
    const struct sort_item *x = a, *y = b;
    int c = sockaddr_cmp(x->addr, y->addr);
    return c ? c : (x->index < y->index ? -1 : x->index > y->index);
}

static int name_item_order(const void *a, const void *b)
{
    const struct sort_item *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : (x->index < y->index ? -1 : x->index > y->index);
}

static void warn_add(struct load *ld, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void warn_add(struct load *ld, const char *fmt, ...)
{
    char msg[MSG_MAX];
    int n = snprintf(msg, sizeof(msg), "%s: ", ld->path.p ? ld->path.p : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + n, sizeof(msg) - (size_t)n, fmt, ap);
    va_end(ap);
    struct config *c = ld->cfg;
    c->warnings = xrealloc(c->warnings, (c->nwarnings + 1) * sizeof(char *));
    c->warnings[c->nwarnings++] = xstrdup(msg);
}

/* A path from the file, relative to the config's directory; NULL (and a
 * problem recorded) when present but not a non-empty string. */
static char *get_path(struct load *ld, json_t *obj, const char *key)
{
    json_t *v = get_string(ld, obj, key);
    if (!v)
        return NULL;
    if (!*json_string_value(v)) {
        err_key(ld, key, "must not be empty");
        return NULL;
    }
    return config_resolve_path(ld->dir, json_string_value(v));
}

static int valid_header_name(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '-'))
            return 0;
    return 1;
}

static void parse_client_cert_headers(struct load *ld, json_t *tls, struct config_listener *l)
{
    static const char *const known[] = { "subject", "fingerprint", NULL };
    json_t *h = get_typed(ld, tls, "client_cert_headers", JSON_OBJECT);
    if (!h)
        return;
    push_key(ld, "client_cert_headers");
    check_keys(ld, h, known, NULL);
    char **out[] = { &l->client_subject_header, &l->client_fp_header };
    for (int i = 0; i < 2; i++) {
        json_t *v = get_string(ld, h, known[i]);
        if (!v)
            continue;
        if (!valid_header_name(json_string_value(v)))
            err_key(ld, known[i], "not a header name (letters, digits and '-')");
        else
            *out[i] = xstrdup(json_string_value(v));
    }
    pop(ld);
}

/* "alpn": the protocols offered, in our order of preference; default
 * ["h2", "http/1.1"]. Written into o->alpn in ALPN wire format. */
static void parse_alpn(struct load *ld, json_t *tls, struct tls_server_opts *o)
{
    static const char *const protos[] = { "h2", "http/1.1" };
    char shown[SHOW_BUF];
    json_t *a = get_typed(ld, tls, "alpn", JSON_ARRAY);
    size_t n = 0;
    int seen[2] = { 0, 0 };
    if (!json_object_get(tls, "alpn")) {
        memcpy(o->alpn, "\x02h2\x08http/1.1", 12);
        o->alpn_len = 12;
        return;
    }
    if (!a)
        return;
    if (json_array_size(a) == 0) {
        err_key(ld, "alpn", "must not be empty (offer at least \"http/1.1\")");
        return;
    }
    push_key(ld, "alpn");
    for (size_t i = 0; i < json_array_size(a); i++) {
        json_t *v = json_array_get(a, i);
        push_index(ld, i);
        int k = -1;
        for (int j = 0; j < 2 && json_is_string(v); j++)
            if (strcmp(json_string_value(v), protos[j]) == 0)
                k = j;
        if (k < 0)
            err(ld, "%s is not one of \"h2\", \"http/1.1\"", show(ld, v, shown, sizeof(shown)));
        else if (seen[k]++)
            err(ld, "\"%s\" is listed twice", protos[k]);
        else {
            size_t len = strlen(protos[k]);
            o->alpn[n++] = (unsigned char)len;
            memcpy(o->alpn + n, protos[k], len);
            n += len;
        }
        pop(ld);
    }
    pop(ld);
    o->alpn_len = n;
}

/* The listener's "tls" block: options first, then the certificates. */
static void parse_listener_tls(struct load *ld, json_t *tls, struct config_listener *l)
{
    static const char *const known[] = {
        "certificates", "min_version", "ciphers", "ciphersuites", "client_ca", "verify",
        "client_cert_headers", "session_cache", "session_tickets", "ticket_rotation_s",
        "handshake_timeout_ms", "alpn", NULL,
    };
    char why[512], warn[512], shown[SHOW_BUF];
    struct tls_server_opts o = { .session_cache = -1 };
    long long cache, rot;
    if (!json_is_object(tls)) {
        err(ld,
            "expected an object like {\"certificates\": [{\"cert\": \"a.crt\", \"key\": "
            "\"a.key\"}]}, "
            "got %s",
            type_name(tls));
        return;
    }
    check_keys(ld, tls, known, NULL);
    size_t before = ld->nprobs;
    json_t *mv = get_string(ld, tls, "min_version");
    if (mv) {
        o.min_version = tls_version_parse(json_string_value(mv));
        if (!o.min_version)
            err_key(ld, "min_version",
                    "%s is not one of \"TLSv1.0\", \"TLSv1.1\", \"TLSv1.2\", \"TLSv1.3\"",
                    show(ld, mv, shown, sizeof(shown)));
    }
    json_t *ci = get_string(ld, tls, "ciphers"), *cs = get_string(ld, tls, "ciphersuites");
    o.ciphers = ci ? json_string_value(ci) : NULL;
    o.ciphersuites = cs ? json_string_value(cs) : NULL;
    char *client_ca = get_path(ld, tls, "client_ca");
    o.client_ca = client_ca;
    json_t *vf = get_string(ld, tls, "verify");
    o.verify = client_ca ? TLS_VERIFY_REQUIRED : TLS_VERIFY_NONE;
    if (vf) {
        const char *v = json_string_value(vf);
        if (!client_ca)
            err_key(ld, "verify", "needs \"client_ca\" (the CA that signs client certificates)");
        else if (strcmp(v, "optional") == 0)
            o.verify = TLS_VERIFY_OPTIONAL;
        else if (strcmp(v, "required") != 0)
            err_key(ld, "verify", "%s is not one of \"required\", \"optional\"",
                    show(ld, vf, shown, sizeof(shown)));
    }
    parse_client_cert_headers(ld, tls, l);
    if ((l->client_subject_header || l->client_fp_header) && !client_ca)
        err_key(ld, "client_cert_headers",
                "needs \"client_ca\" (only verified certificates are passed on)");
    get_int(ld, tls, "session_cache", 0, 10000000, -1, &cache);
    o.session_cache = (long)cache;
    get_bool(ld, tls, "session_tickets", 1, &o.session_tickets);
    get_int(ld, tls, "ticket_rotation_s", 60, 7 * 86400, 3600, &rot);
    o.ticket_rotation_s = (int)rot;
    get_timeout(ld, tls, "handshake_timeout_ms", 10000, &l->tls_handshake_timeout_ms);
    o.session_id = l->address;
    parse_alpn(ld, tls, &o);
    json_t *certs = get_typed(ld, tls, "certificates", JSON_ARRAY);
    if (!json_object_get(tls, "certificates"))
        err_key(ld, "certificates",
                "required (like [{\"cert\": \"/etc/portico/tls/a.crt\", \"key\": "
                "\"/etc/portico/tls/a.key\"}])");
    else if (certs && json_array_size(certs) == 0)
        err_key(ld, "certificates", "must not be empty");
    if (ld->nprobs != before || !certs || json_array_size(certs) == 0) {
        free(client_ca);
        return;
    }
    struct tls_server *s = tls_server_new(&o, why, sizeof(why));
    free(client_ca);
    if (!s) {
        err(ld, "%s", why);
        return;
    }
    push_key(ld, "certificates");
    for (size_t i = 0; i < json_array_size(certs); i++) {
        static const char *const ckeys[] = { "cert", "key", NULL };
        json_t *e = json_array_get(certs, i);
        push_index(ld, i);
        if (!json_is_object(e)) {
            err(ld, "expected an object like {\"cert\": \"a.crt\", \"key\": \"a.key\"}, got %s",
                type_name(e));
            pop(ld);
            continue;
        }
        check_keys(ld, e, ckeys, NULL);
        char *cp = get_path(ld, e, "cert"), *kp = get_path(ld, e, "key");
        if (!json_object_get(e, "cert"))
            err_key(ld, "cert", "required (a PEM file: the certificate, then its chain)");
        if (!json_object_get(e, "key"))
            err_key(ld, "key", "required (a PEM file with the private key)");
        int which = 0;
        if (cp && kp &&
            tls_server_add_cert(s, cp, kp, why, sizeof(why), &which, warn, sizeof(warn)) < 0)
            err_key(ld, which ? "key" : "cert", "%s", why);
        else if (cp && kp && warn[0])
            warn_add(ld, "%s", warn);
        free(cp);
        free(kp);
        pop(ld);
    }
    pop(ld);
    if (ld->nprobs == before && tls_server_finish(s, why, sizeof(why)) < 0)
        err(ld, "%s", why);
    if (ld->nprobs != before) {
        tls_server_free(s);
        return;
    }
    l->tls = s;
}

/* "redirect_to_https": true, or {"port": 8443}. */
static void parse_redirect(struct load *ld, json_t *obj, struct config_listener *l)
{
    static const char *const known[] = { "port", NULL };
    json_t *v = json_object_get(obj, "redirect_to_https");
    if (!v)
        return;
    if (json_is_boolean(v)) {
        l->redirect_to_https = json_is_true(v);
    } else if (json_is_object(v)) {
        push_key(ld, "redirect_to_https");
        check_keys(ld, v, known, NULL);
        get_int_field(ld, v, "port", 1, 65535, 0, &l->redirect_port);
        if (l->redirect_port == 443)
            l->redirect_port = 0;
        pop(ld);
        l->redirect_to_https = 1;
    } else {
        err_key(ld, "redirect_to_https", "expected true, false or {\"port\": 8443}, got %s",
                type_name(v));
        return;
    }
    if (l->redirect_to_https && json_object_get(obj, "tls"))
        err_key(ld, "redirect_to_https", "only for a plain listener (this one has \"tls\")");
}

static void parse_listener(struct load *ld, json_t *obj, struct config_listener *l)
{
    static const char *const known[] = { "address", "backlog", "tls", "redirect_to_https", NULL };
    char why[128], shown[SHOW_BUF];
    long long backlog;

    if (!json_is_object(obj)) {
        err(ld, "expected an object like {\"address\": \"127.0.0.1:8080\"}, got %s", type_name(obj));
        return;
    }
    check_keys(ld, obj, known, NULL);
    get_int(ld, obj, "backlog", 1, 65535, 511, &backlog);
    l->backlog = (int)backlog;
    json_t *a = get_string(ld, obj, "address");
    if (!json_object_get(obj, "address"))
        err_key(ld, "address", "required (like \"127.0.0.1:8080\", \"[::1]:8080\" or \"*:8080\")");
    if (a) {
        l->address = xstrdup(json_string_value(a));
        if (addr_parse(l->address, &l->addr, &l->addrlen, why, sizeof(why)) < 0)
            err_key(ld, "address", "%s: %s", show(ld, a, shown, sizeof(shown)), why);
    }
    parse_redirect(ld, obj, l);
    json_t *tls = json_object_get(obj, "tls");
    if (tls) {
        push_key(ld, "tls");
        parse_listener_tls(ld, tls, l);
        pop(ld);
    }
}

/* "admin": { "address": "127.0.0.1:9901", "token": "${ADMIN_TOKEN}" }.
 * Absent: no admin listener. A non-loopback address needs a token. */
static void parse_admin(struct load *ld, json_t *root)
{
    static const char *const known[] = { "address", "token", "ready_requires", NULL };
    struct config_admin *a = &ld->cfg->admin;
    json_t *obj = get_typed(ld, root, "admin", JSON_OBJECT);
    if (!obj)
        return;
    char why[128], shown[SHOW_BUF];
    push_key(ld, "admin");
    check_keys(ld, obj, known, NULL);
    a->enabled = 1;
    json_t *v = get_string(ld, obj, "address");
    a->address = xstrdup(v ? json_string_value(v) : "127.0.0.1:9901");
    if (addr_parse(a->address, &a->addr, &a->addrlen, why, sizeof(why)) < 0) {
        if (v)
            err_key(ld, "address", "%s: %s", show(ld, v, shown, sizeof(shown)), why);
    }
    v = get_string(ld, obj, "token");
    if (v && json_string_length(v) == 0)
        err_key(ld, "token", "must not be empty (leave it out for no token)");
    else if (v)
        a->token = xstrdup(json_string_value(v));
    json_t *rr = get_typed(ld, obj, "ready_requires", JSON_ARRAY);
    size_t k;
    json_t *it;
    json_array_foreach(rr, k, it) {
        if (json_is_string(it) && strcmp(json_string_value(it), "modules") == 0) {
            a->ready_modules = 1;
        } else if (json_is_string(it) && strcmp(json_string_value(it), "healthy_endpoints") == 0) {
            a->ready_endpoints = 1;
        } else {
            push_key(ld, "ready_requires");
            push_index(ld, k);
            err(ld, "must be \"modules\" (what modules depend on, such as rate_limit's Redis, is "
                    "reachable) or \"healthy_endpoints\" (every upstream has one)");
            pop(ld);
            pop(ld);
        }
    }
    if (a->addrlen && !a->token && !addr_is_loopback((const struct sockaddr *)&a->addr))
        err_key(ld, "address", "an admin listener on a non-loopback address needs \"token\"");
    for (size_t i = 0; a->addrlen && i < ld->cfg->nlisteners; i++)
        if (sockaddr_cmp(&ld->cfg->listeners[i].addr, &a->addr) == 0)
            err_key(ld, "address", "the same address as listeners[%zu]", i);
    pop(ld);
}

static void parse_listeners(struct load *ld, json_t *root)
{
    struct config *c = ld->cfg;
    json_t *arr = get_typed(ld, root, "listeners", JSON_ARRAY);
    if (!json_object_get(root, "listeners")) {
        err_key(ld, "listeners", "required (at least one, like [{\"address\": \"127.0.0.1:8080\"}])");
        return;
    }
    if (!arr)
        return;
    if (json_array_size(arr) == 0) {
        err_key(ld, "listeners", "must not be empty");
        return;
    }
    c->nlisteners = json_array_size(arr);
    c->listeners = xcalloc(c->nlisteners, sizeof(*c->listeners));
    push_key(ld, "listeners");
    for (size_t i = 0; i < c->nlisteners; i++) {
        push_index(ld, i);
        parse_listener(ld, json_array_get(arr, i), &c->listeners[i]);
        pop(ld);
    }
    /* Duplicates: sort the parsed ones by address, compare neighbours. */
    struct sort_item *items = xcalloc(c->nlisteners, sizeof(*items));
    size_t n = 0;
    for (size_t i = 0; i < c->nlisteners; i++)
        if (c->listeners[i].addrlen)
            items[n++] = (struct sort_item){ .addr = &c->listeners[i].addr, .index = i };
    qsort(items, n, sizeof(*items), addr_item_order);
    for (size_t k = 1, first = 0; k < n; k++) {
        if (sockaddr_cmp(items[k].addr, items[first].addr) != 0) {
            first = k;
            continue;
        }
        push_index(ld, items[k].index);
        err_key(ld, "address", "the same address as listeners[%zu]", items[first].index);
        pop(ld);
    }
    free(items);
    pop(ld);
}

static void parse_limits(struct load *ld, json_t *root)
{
    static const char *const known[] = {
        "max_header_bytes", "max_headers", "max_uri_bytes", "max_body_bytes",
        "header_timeout_ms", "body_timeout_ms", "body_min_rate", "idle_timeout_ms",
        "send_timeout_ms", "max_connections", "drain_timeout_ms", "drain_idle_ms", NULL,
    };
    struct config_limits *l = &ld->cfg->limits;
    long long v;
    json_t *obj = get_typed(ld, root, "limits", JSON_OBJECT);
    json_t *empty = obj ? NULL : json_object();
    if (!obj)
        obj = empty;
    push_key(ld, "limits");
    check_keys(ld, obj, known, no_keys);
    get_int(ld, obj, "max_header_bytes", 1024, 1048576, 16384, &v);
    l->max_header_bytes = (size_t)v;
    get_int(ld, obj, "max_headers", 1, 1000, 100, &v);
    l->max_headers = (size_t)v;
    if (get_int(ld, obj, "max_uri_bytes", 256, 65536, 8192, &v) == 0 &&
        (size_t)v > l->max_header_bytes) {
        err_key(ld, "max_uri_bytes", "must not exceed max_header_bytes (%zu), got %lld",
                l->max_header_bytes, v);
    }
    l->max_uri_bytes = (size_t)v;
    get_int(ld, obj, "max_body_bytes", 0, LLONG_MAX, 10485760, &v);
    l->max_body_bytes = (uint64_t)v;
    get_int(ld, obj, "body_min_rate", 0, LLONG_MAX, 1024, &v);
    l->body_min_rate = (uint64_t)v;
    get_int_field(ld, obj, "max_connections", 1, 10000000, 10000, &l->max_connections);
    get_timeout(ld, obj, "header_timeout_ms", 10000, &l->header_timeout_ms);
    get_timeout(ld, obj, "body_timeout_ms", 30000, &l->body_timeout_ms);
    get_timeout(ld, obj, "idle_timeout_ms", 60000, &l->idle_timeout_ms);
    get_timeout(ld, obj, "send_timeout_ms", 60000, &l->send_timeout_ms);
    get_timeout(ld, obj, "drain_timeout_ms", 30000, &l->drain_timeout_ms);
    get_timeout(ld, obj, "drain_idle_ms", 1000, &l->drain_idle_ms);
    pop(ld);
    json_decref(empty);
}

static void parse_http2(struct load *ld, json_t *root)
{
    static const char *const known[] = {
        "max_concurrent_streams", "initial_window_size", "connection_window_size",
        "max_requests", "max_resets_per_s", "reset_burst", "max_control_frames_per_s",
        "max_empty_frames", "max_continuations", NULL,
    };
    struct config_http2 *h = &ld->cfg->http2;
    json_t *obj = get_typed(ld, root, "http2", JSON_OBJECT);
    json_t *empty = obj ? NULL : json_object();
    if (!obj)
        obj = empty;
    push_key(ld, "http2");
    check_keys(ld, obj, known, no_keys);
    get_int_field(ld, obj, "max_concurrent_streams", 1, 10000, 128, &h->max_concurrent_streams);
    /* RFC 9113 6.5.2: a window above 2^31-1 is a protocol error. */
    get_int_field(ld, obj, "initial_window_size", 1024, 16777216, 65535, &h->initial_window_size);
    get_int_field(ld, obj, "connection_window_size", 65535, 2147483647, 1048576,
                  &h->connection_window_size);
    get_int_field(ld, obj, "max_requests", 1, 100000000, 10000, &h->max_requests);
    get_int_field(ld, obj, "max_resets_per_s", 1, 1000000, 33, &h->max_resets_per_s);
    get_int_field(ld, obj, "reset_burst", 1, 1000000, 200, &h->reset_burst);
    get_int_field(ld, obj, "max_control_frames_per_s", 1, 1000000, 100,
                  &h->max_control_frames_per_s);
    get_int_field(ld, obj, "max_empty_frames", 0, 1000000, 10, &h->max_empty_frames);
    get_int_field(ld, obj, "max_continuations", 0, 10000, 8, &h->max_continuations);
    pop(ld);
    json_decref(empty);
}

/* A sampling rate: a number in (0, 1]; absent leaves *out as it is. */
static void get_sample(struct load *ld, json_t *obj, const char *key, double *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return;
    if (!json_is_number(v) || json_number_value(v) <= 0 || json_number_value(v) > 1) {
        err_key(ld, key, "must be a number above 0 and at most 1 (the share of requests logged)");
        return;
    }
    *out = json_number_value(v);
}

static void parse_access_log(struct load *ld, json_t *root)
{
    static const char *const known[] = { "path", "format", "template", "sample", NULL };
    char shown[SHOW_BUF], why[128];
    json_t *obj = get_typed(ld, root, "access_log", JSON_OBJECT);
    const char *path = "-";
    ld->cfg->access_log.sample = 1.0;
    if (obj) {
        push_key(ld, "access_log");
        check_keys(ld, obj, known, no_keys);
        json_t *p = get_string(ld, obj, "path");
        if (p && (json_string_length(p) == 0 || has_ctl(json_string_value(p))))
            err_key(ld, "path", "must be \"-\" (stdout), \"stderr\", \"off\" or a file path");
        else if (p)
            path = json_string_value(p);
        json_t *f = get_string(ld, obj, "format");
        if (f && strcmp(json_string_value(f), "text") == 0)
            ld->cfg->access_log.text = 1;
        else if (f && strcmp(json_string_value(f), "json") != 0)
            err_key(ld, "format", "%s: must be \"json\" or \"text\"", show(ld, f, shown, sizeof(shown)));
        json_t *t = get_string(ld, obj, "template");
        if (t && !ld->cfg->access_log.text)
            err_key(ld, "template", "only with \"format\": \"text\"");
        else if (t && accesslog_template_check(json_string_value(t), why, sizeof(why)) < 0)
            err_key(ld, "template", "%s", why);
        else if (t && has_ctl(json_string_value(t)))
            err_key(ld, "template", "must not contain control characters");
        else if (t)
            ld->cfg->access_log.template = xstrdup(json_string_value(t));
        if (ld->cfg->access_log.text && !ld->cfg->access_log.template)
            ld->cfg->access_log.template = xstrdup(ACCESSLOG_TEXT_DEFAULT);
        get_sample(ld, obj, "sample", &ld->cfg->access_log.sample);
        pop(ld);
    }
    if (strcmp(path, "-") == 0 || strcmp(path, "off") == 0 || strcmp(path, "stderr") == 0)
        ld->cfg->access_log.path = xstrdup(path);
    else
        ld->cfg->access_log.path = config_resolve_path(ld->dir, path);
}

static void parse_trusted_proxies(struct load *ld, json_t *root)
{
    struct config *c = ld->cfg;
    char why[128], shown[SHOW_BUF];
    json_t *arr = get_typed(ld, root, "trusted_proxies", JSON_ARRAY);
    if (!arr)
        return;
    push_key(ld, "trusted_proxies");
    c->trusted_proxies = xcalloc(json_array_size(arr), sizeof(*c->trusted_proxies));
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *v = json_array_get(arr, i);
        push_index(ld, i);
        if (!json_is_string(v))
            err(ld, "expected a string like \"10.0.0.0/8\", got %s", type_name(v));
        else if (cidr_parse(json_string_value(v), &c->trusted_proxies[c->ntrusted_proxies], why,
                            sizeof(why)) < 0)
            err(ld, "%s: %s", show(ld, v, shown, sizeof(shown)), why);
        else
            c->ntrusted_proxies++;
        pop(ld);
    }
    pop(ld);
}

/* ------------------------------------------------------------------ */
/* Upstreams.                                                           */

static int valid_upstream_name(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || *s == '.' || *s == '-'))
            return 0;
    return 1;
}

static void parse_endpoints(struct load *ld, json_t *obj, struct config_upstream *u)
{
    char why[128], shown[SHOW_BUF];
    json_t *arr = get_typed(ld, obj, "endpoints", JSON_ARRAY);
    if (!json_object_get(obj, "endpoints")) {
        err_key(ld, "endpoints", "required (like [\"127.0.0.1:8000\"])");
        return;
    }
    if (!arr)
        return;
    if (json_array_size(arr) == 0) {
        err_key(ld, "endpoints", "must not be empty");
        return;
    }
    u->endpoints = xcalloc(json_array_size(arr), sizeof(*u->endpoints));
    push_key(ld, "endpoints");
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *v = json_array_get(arr, i);
        struct config_endpoint *e = &u->endpoints[u->nendpoints];
        push_index(ld, i);
        v = config_endpoint_address(ld, v);
        if (!v) {
        } else if (!json_is_string(v)) {
            err(ld, "expected a string like \"127.0.0.1:8000\", got %s", type_name(v));
        } else if (addr_parse(json_string_value(v), &e->addr, &e->addrlen, why, sizeof(why)) < 0) {
            if (strstr(why, "host names")) {
                if (config_endpoint_name(ld, v, e) == 0)
                    u->nendpoints++;
            } else
                err(ld, "%s: %s", show(ld, v, shown, sizeof(shown)), why);
        } else if (json_string_value(v)[0] == '*') {
            err(ld, "\"*\" (any address) cannot be an endpoint; name the upstream's IP");
        } else {
            e->address = xstrdup(json_string_value(v));
            u->nendpoints++;
        }
        pop(ld);
    }
    pop(ld);
}

static int valid_host_name(const char *h);

/* An upstream's "tls": {"verify", "ca", "sni", "cert", "key"} (or true). */
static void parse_upstream_tls(struct load *ld, json_t *tls, struct config_upstream *u)
{
    static const char *const known[] = { "verify", "ca", "sni", "cert", "key", NULL };
    static const char *const which_key[] = { "ca", "cert", "key" };
    char why[512];
    struct tls_client_opts o = { .verify = 1, .h2 = u->h2 };
    if (json_is_false(tls))
        return;
    if (!json_is_true(tls) && !json_is_object(tls)) {
        err(ld, "expected true or an object like {\"verify\": true, \"ca\": \"ca.pem\"}, got %s",
            type_name(tls));
        return;
    }
    size_t before = ld->nprobs;
    char *ca = NULL, *cert = NULL, *key = NULL;
    if (json_is_object(tls)) {
        check_keys(ld, tls, known, NULL);
        get_bool(ld, tls, "verify", 1, &o.verify);
        ca = get_path(ld, tls, "ca");
        cert = get_path(ld, tls, "cert");
        key = get_path(ld, tls, "key");
        json_t *sni = get_string(ld, tls, "sni");
        if (sni) {
            if (!valid_host_name(json_string_value(sni)))
                err_key(ld, "sni", "not a host name");
            o.sni = json_string_value(sni);
        }
        if (!!json_object_get(tls, "cert") != !!json_object_get(tls, "key"))
            err(ld, "\"cert\" and \"key\" go together (a client certificate and its key)");
    }
    o.ca = ca;
    o.cert = cert;
    o.key = key;
    if (ld->nprobs == before) {
        int which = 0;
        u->tls = tls_client_new(&o, why, sizeof(why), &which);
        if (!u->tls)
            err_key(ld, which_key[which], "%s", why);
    }
    free(ca);
    free(cert);
    free(key);
}

static void parse_upstream(struct load *ld, json_t *obj, struct config_upstream *u)
{
    static const char *const known[] = {
        "endpoints",          "balance",   "connect_timeout_ms",
        "timeout_ms",         "keepalive", "keepalive_timeout_ms",
        "keepalive_requests", "tls",       "retry",
        "circuit_breaker",    "health_check", "hash_on",
        "max_requests",       "max_pending",  "dns",       "protocol", NULL,
    };
    static const char *const later[] = { NULL };

    if (!json_is_object(obj)) {
        err(ld, "expected an object like {\"endpoints\": [\"127.0.0.1:8000\"]}, got %s", type_name(obj));
        return;
    }
    check_keys(ld, obj, known, later);
    parse_endpoints(ld, obj, u);
    get_timeout(ld, obj, "connect_timeout_ms", 1000, &u->connect_timeout_ms);
    get_timeout(ld, obj, "timeout_ms", 60000, &u->timeout_ms);
    get_int_field(ld, obj, "keepalive", 0, 10000, 64, &u->keepalive);
    get_timeout(ld, obj, "keepalive_timeout_ms", 30000, &u->keepalive_timeout_ms);
    get_int_field(ld, obj, "keepalive_requests", 1, 1000000000, 10000, &u->keepalive_requests);
    json_t *proto = get_string(ld, obj, "protocol");
    json_t *tls = json_object_get(obj, "tls");
    if (proto) {
        const char *p = json_string_value(proto);
        char shown[SHOW_BUF];
        if (strcmp(p, "h2c") == 0 || strcmp(p, "h2") == 0)
            u->h2 = 1;
        else if (strcmp(p, "http/1.1") != 0)
            err_key(ld, "protocol", "%s is not one of \"http/1.1\", \"h2c\", \"h2\"",
                    show(ld, proto, shown, sizeof(shown)));
        if (strcmp(p, "h2") == 0 && (!tls || json_is_false(tls)))
            err_key(ld, "protocol", "\"h2\" is HTTP/2 over TLS: it needs \"tls\" (or use \"h2c\")");
        if (strcmp(p, "h2c") == 0 && tls && !json_is_false(tls))
            err_key(ld, "protocol", "\"h2c\" is HTTP/2 in the clear: with \"tls\", use \"h2\"");
    }
    if (tls) {
        push_key(ld, "tls");
        parse_upstream_tls(ld, tls, u);
        pop(ld);
    }
    config_parse_resilience(ld, obj, u);
}

static void parse_upstreams(struct load *ld, json_t *root)
{
    struct config *c = ld->cfg;
    const char *name;
    json_t *v;
    json_t *obj = get_typed(ld, root, "upstreams", JSON_OBJECT);
    if (!obj)
        return;
    c->upstreams = xcalloc(json_object_size(obj), sizeof(*c->upstreams));
    push_key(ld, "upstreams");
    json_object_foreach(obj, name, v) {
        struct config_upstream *u = &c->upstreams[c->nupstreams];
        u->name = xstrdup(name);
        u->index = c->nupstreams++;
        push_key(ld, name);
        if (!valid_upstream_name(name))
            err(ld, "invalid upstream name (use letters, digits, '_', '.' and '-')");
        parse_upstream(ld, v, u);
        pop(ld);
    }
    pop(ld);
}

/* ------------------------------------------------------------------ */
/* Routes.                                                              */

static const struct {
    const char *name;
    enum http_method m;
} known_methods[] = {
    { "GET", HTTP_M_GET }, { "HEAD", HTTP_M_HEAD }, { "POST", HTTP_M_POST },
    { "PUT", HTTP_M_PUT }, { "DELETE", HTTP_M_DELETE }, { "OPTIONS", HTTP_M_OPTIONS },
    { "PATCH", HTTP_M_PATCH }, { "TRACE", HTTP_M_TRACE },
};

/* RFC 9110 tchar. */
static int is_tchar(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static void parse_method(struct load *ld, struct config_route *r, json_t *v)
{
    char shown[SHOW_BUF];
    if (!json_is_string(v)) {
        err(ld, "expected a method name like \"GET\", got %s", type_name(v));
        return;
    }
    const char *m = json_string_value(v);
    int token = *m != '\0' && strlen(m) <= 32, lower = 0;
    for (const char *p = m; *p && token; p++) {
        token = is_tchar(*p);
        lower |= *p >= 'a' && *p <= 'z';
    }
    if (!token) {
        err(ld, "%s is not a valid method name", show(ld, v, shown, sizeof(shown)));
        return;
    }
    if (lower) {
        err(ld, "%s: methods are case-sensitive and written in upper case",
            show(ld, v, shown, sizeof(shown)));
        return;
    }
    if (strcmp(m, "CONNECT") == 0) {
        err(ld, "\"CONNECT\" cannot be routed (CONNECT requests are refused with 501)");
        return;
    }
    for (size_t i = 0; i < sizeof(known_methods) / sizeof(known_methods[0]); i++) {
        if (strcmp(m, known_methods[i].name) == 0) {
            if (r->methods & ROUTE_METHOD_BIT(known_methods[i].m))
                err(ld, "\"%s\" is listed twice", m);
            r->methods |= ROUTE_METHOD_BIT(known_methods[i].m);
            return;
        }
    }
    for (size_t i = 0; i < r->nother_methods; i++) {
        if (strcmp(r->other_methods[i], m) == 0) {
            err(ld, "%s is listed twice", show(ld, v, shown, sizeof(shown)));
            return;
        }
    }
    r->other_methods[r->nother_methods++] = xstrdup(m);
}

static void parse_methods(struct load *ld, json_t *obj, struct config_route *r)
{
    json_t *arr = get_typed(ld, obj, "methods", JSON_ARRAY);
    if (!arr)
        return;
    if (json_array_size(arr) == 0) {
        err_key(ld, "methods", "must not be empty (leave it out to allow every method)");
        return;
    }
    r->other_methods = xcalloc(json_array_size(arr), sizeof(*r->other_methods));
    push_key(ld, "methods");
    for (size_t i = 0; i < json_array_size(arr); i++) {
        push_index(ld, i);
        parse_method(ld, r, json_array_get(arr, i));
        pop(ld);
    }
    pop(ld);
    /* RFC 9110 9.3.2: HEAD is GET without the body; a route that serves
     * GET serves HEAD (as nginx's limit_except does). */
    if (r->methods & ROUTE_METHOD_BIT(HTTP_M_GET))
        r->methods |= ROUTE_METHOD_BIT(HTTP_M_HEAD);
}

/* A DNS-style host name: labels of letters, digits, '-' and '_', 1..63
 * bytes each, 253 in all. */
static int valid_host_name(const char *h)
{
    size_t label = 0, total = strlen(h);
    if (total == 0 || total > 253)
        return 0;
    for (; *h; h++) {
        if (*h == '.') {
            if (label == 0)
                return 0;
            label = 0;
        } else if ((*h >= 'a' && *h <= 'z') || (*h >= '0' && *h <= '9') || *h == '-' || *h == '_') {
            if (++label > 63)
                return 0;
        } else {
            return 0;
        }
    }
    return label > 0;
}

static void parse_host(struct load *ld, json_t *obj, struct config_route *r)
{
    char shown[SHOW_BUF];
    json_t *v = get_string(ld, obj, "host");
    if (!v)
        return;
    char *h = xstrdup(json_string_value(v));
    for (char *p = h; *p; p++)
        if (*p >= 'A' && *p <= 'Z')
            *p = (char)(*p - 'A' + 'a');
    size_t n = strlen(h);
    if (n > 1 && h[n - 1] == '.') /* "example.com." names the same host */
        h[--n] = '\0';
    int wild = strncmp(h, "*.", 2) == 0;
    if (strchr(h, ':') && h[0] != '[') {
        err_key(ld, "host", "%s: must not include a port (the Host header's port is ignored)",
                show(ld, v, shown, sizeof(shown)));
    } else if (strcmp(h, "*") == 0) {
        err_key(ld, "host", "\"*\" alone is not a pattern; leave \"host\" out to match any host");
    } else if (!valid_host_name(wild ? h + 2 : h)) {
        err_key(ld, "host", "%s is not a host name like \"api.example.com\" or \"*.example.com\"",
                show(ld, v, shown, sizeof(shown)));
    } else {
        r->host = h;
        r->host_wildcard = wild;
        return;
    }
    free(h);
}

/* Bytes a normalised request path can hold (RFC 3986 pchar and '/'). */
static int is_path_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("-._~!$&'()*+,;=:@%/", c));
}

/* Check a path-like value: starts with '/', only URI path bytes.
 * Returns 0 or -1 after recording a problem at key. */
static int check_path_chars(struct load *ld, const char *key, const char *p)
{
    if (p[0] != '/') {
        err_key(ld, key, "must start with '/'");
        return -1;
    }
    for (; *p; p++) {
        if (!is_path_char(*p)) {
            if (*p == '?' || *p == '#')
                err_key(ld, key, "must not contain '%c' (routes match the path only)", *p);
            else
                err_key(ld, key, "contains a byte that cannot appear in a request path "
                                 "(percent-encode it)");
            return -1;
        }
    }
    return 0;
}

static void parse_path(struct load *ld, json_t *obj, struct config_route *r)
{
    json_t *v = get_string(ld, obj, "path");
    if (!json_object_get(obj, "path")) {
        err_key(ld, "path", "required (like \"/api/\")");
        return;
    }
    if (!v)
        return;
    const char *p = json_string_value(v);
    size_t n = strlen(p), outlen = 0;
    if (check_path_chars(ld, "path", p) < 0)
        return;
    char *norm = xmalloc(n + 1);
    if (uri_normalize_path(p, n, norm, n + 1, &outlen) < 0) {
        err_key(ld, "path", "is not a valid path (a bad %%-escape, an encoded '/', '\\' or NUL, "
                            "or \"..\" above the root); no request could match it");
    } else if (outlen != n || memcmp(norm, p, n) != 0) {
        struct sbuf s = { 0 };
        if (!find_note(ld, v))
            sb_put_escaped(&s, norm, outlen, SHOW_MAX);
        err_key(ld, "path", "is not a normalised path (no \"//\", \".\" or \"..\" segments, "
                            "no %%-escapes of unreserved characters, upper-case hex)%s%s%s",
                s.p ? "; write \"" : "", s.p ? s.p : "", s.p ? "\"" : "");
        free(s.p);
    } else {
        r->path = xstrdup(p);
        r->path_len = n;
    }
    free(norm);
}

static void parse_respond(struct load *ld, json_t *obj, struct config_route *r)
{
    static const char *const known[] = { "status", "body", "content_type", NULL };
    long long status;
    if (!json_is_object(obj)) {
        err(ld, "expected an object like {\"status\": 200, \"body\": \"ok\\n\"}, got %s", type_name(obj));
        return;
    }
    check_keys(ld, obj, known, no_keys);
    if (!json_object_get(obj, "status"))
        err_key(ld, "status", "required (200 to 599)");
    else if (get_int(ld, obj, "status", 200, 599, 0, &status) == 0)
        r->respond_status = (int)status;
    json_t *body = get_string(ld, obj, "body");
    r->respond_body = xstrdup(body ? json_string_value(body) : "");
    r->respond_body_len = strlen(r->respond_body);
    if (r->respond_body_len && (r->respond_status == 204 || r->respond_status == 304))
        err_key(ld, "body", "a %d response cannot have a body", r->respond_status);
    json_t *ct = get_string(ld, obj, "content_type");
    if (ct && (json_string_length(ct) == 0 || has_ctl(json_string_value(ct))))
        err_key(ld, "content_type", "must be a non-empty header value without control characters");
    r->respond_content_type =
        xstrdup(ct ? json_string_value(ct) : "text/plain; charset=utf-8");
}

/* Record a module's parse error. The module names the full path in its
 * message ("<path>.key: what"); the part after our path is moved into the
 * recorded path so the line lookup and the format stay ours. */
static void filter_error(struct load *ld, const char *msg)
{
    const char *colon = strstr(msg, ": ");
    size_t plen = ld->path.len;
    if (colon && strncmp(msg, ld->path.p ? ld->path.p : "", plen) == 0 && (size_t)(colon - msg) >= plen) {
        mark_push(ld);
        sb_putn(&ld->path, msg + plen, (size_t)(colon - msg) - plen);
        err(ld, "%s", colon + 2);
        pop(ld);
    } else {
        err(ld, "%s", msg);
    }
}

/* "filters": [ { "<module>": <config> }, ... ] of a route or the top level. */
static void parse_filters(struct load *ld, json_t *obj, struct filter_conf **out, size_t *nout)
{
    json_t *arr = get_typed(ld, obj, "filters", JSON_ARRAY);
    if (!arr)
        return;
    *out = xcalloc(json_array_size(arr) ? json_array_size(arr) : 1, sizeof(**out));
    push_key(ld, "filters");
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *f = json_array_get(arr, i);
        push_index(ld, i);
        if (!json_is_object(f)) {
            err(ld, "expected an object like {\"request_id\": {}}, got %s", type_name(f));
        } else if (json_object_size(f) != 1) {
            err(ld, "must have exactly one key, the module name, like {\"request_id\": {}}");
        } else {
            const char *key = json_object_iter_key(json_object_iter(f));
            const struct module *m = modules_find(key);
            if (!m) {
                struct sbuf name = { 0 };
                sb_put_escaped(&name, key, strlen(key), SHOW_MAX);
                err(ld, "module \"%s\" is not built into this binary (portico -V lists the modules)",
                    name.p);
                free(name.p);
            } else {
                push_key(ld, key);
                char msg[MSG_MAX] = "";
                void *cfg = NULL;
                void *gcfg = config_module_global(ld->cfg, m);
                if (m->parse_config(json_object_get(f, key), ld->path.p, gcfg, &cfg, msg,
                                    sizeof(msg)) < 0) {
                    filter_error(ld, msg[0] ? msg : "invalid configuration");
                } else {
                    (*out)[*nout].m = m;
                    (*out)[*nout].cfg = cfg;
                    (*nout)++;
                }
                pop(ld);
            }
        }
        pop(ld);
    }
    pop(ld);
}

static void filters_free(struct filter_conf *f, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (f[i].m->free_config)
            f[i].m->free_config(f[i].cfg);
    free(f);
}

/* "upstream" or "respond", and what goes only with "upstream". */
static void parse_target(struct load *ld, json_t *obj, struct config_route *r)
{
    char shown[SHOW_BUF];
    json_t *up = json_object_get(obj, "upstream"), *resp = json_object_get(obj, "respond");
    if (up && resp) {
        err(ld, "has both \"upstream\" and \"respond\"; a route either proxies or answers");
    } else if (!up && !resp) {
        err(ld, "needs either \"upstream\" (proxy to it) or \"respond\" (answer directly)");
    } else if (up && (up = get_string(ld, obj, "upstream"))) {
        r->upstream = config_find_upstream(ld->cfg, json_string_value(up));
        if (!r->upstream)
            err_key(ld, "upstream", "no upstream named %s", show(ld, up, shown, sizeof(shown)));
    } else if (resp) {
        push_key(ld, "respond");
        parse_respond(ld, resp, r);
        pop(ld);
    }

    json_t *strip = get_string(ld, obj, "strip_prefix");
    json_t *rewrite = get_string(ld, obj, "prefix_rewrite");
    if (strip && rewrite)
        err_key(ld, "prefix_rewrite", "cannot be used together with \"strip_prefix\"");
    if (resp && strip)
        err_key(ld, "strip_prefix", "only for routes with \"upstream\"");
    if (resp && rewrite)
        err_key(ld, "prefix_rewrite", "only for routes with \"upstream\"");
    if (strip && check_path_chars(ld, "strip_prefix", json_string_value(strip)) == 0) {
        const char *s = json_string_value(strip);
        if (r->path && strncmp(r->path, s, strlen(s)) != 0)
            err_key(ld, "strip_prefix", "must be a prefix of the route's \"path\"");
        r->strip_prefix = xstrdup(s);
    }
    if (rewrite && check_path_chars(ld, "prefix_rewrite", json_string_value(rewrite)) == 0)
        r->prefix_rewrite = xstrdup(json_string_value(rewrite));
}

static void parse_route_name(struct load *ld, json_t *obj, struct config_route *r, size_t i)
{
    json_t *v = get_string(ld, obj, "name");
    if (v && (json_string_length(v) == 0 || json_string_length(v) > 128 ||
              has_ctl(json_string_value(v)))) {
        err_key(ld, "name", "must be 1 to 128 characters without control characters");
        v = NULL;
    }
    if (v) {
        r->name = xstrdup(json_string_value(v));
    } else {
        char def[48];
        snprintf(def, sizeof(def), "routes[%zu]", i);
        r->name = xstrdup(def);
    }
}

/* "websocket": true lets upgrade requests become tunnels; its timeouts
 * mean nothing without it, so they are refused alone. */
static void parse_websocket(struct load *ld, json_t *obj, struct config_route *r)
{
    long long life;
    get_bool(ld, obj, "websocket", 0, &r->websocket);
    get_timeout(ld, obj, "websocket_idle_timeout_ms", 60000, &r->websocket_idle_timeout_ms);
    get_int(ld, obj, "websocket_max_lifetime_ms", 0, 30 * DAY_MS, 0, &life);
    r->websocket_max_lifetime_ms = life;
    if (r->websocket && !json_object_get(obj, "upstream") && json_object_get(obj, "respond"))
        err_key(ld, "websocket", "only for routes with \"upstream\"");
    if (!r->websocket) {
        if (json_object_get(obj, "websocket_idle_timeout_ms"))
            err_key(ld, "websocket_idle_timeout_ms", "only with \"websocket\": true");
        if (json_object_get(obj, "websocket_max_lifetime_ms"))
            err_key(ld, "websocket_max_lifetime_ms", "only with \"websocket\": true");
    }
}

static struct config_route *parse_route(struct load *ld, json_t *obj, size_t i)
{
    static const char *const known[] = {
        "name", "host", "path", "exact", "methods", "upstream", "respond",
        "strip_prefix", "prefix_rewrite", "filters", "log_sample", "retry_non_idempotent",
        "websocket", "websocket_idle_timeout_ms", "websocket_max_lifetime_ms", NULL,
    };
    struct config_route *r = xcalloc(1, sizeof(*r));
    r->index = i;
    if (!json_is_object(obj)) {
        err(ld, "expected an object like {\"path\": \"/\", \"upstream\": \"app\"}, got %s",
            type_name(obj));
        parse_route_name(ld, NULL, r, i);
        return r;
    }
    check_keys(ld, obj, known, NULL);
    parse_route_name(ld, obj, r, i);
    parse_host(ld, obj, r);
    parse_path(ld, obj, r);
    get_bool(ld, obj, "exact", 0, &r->exact);
    get_bool(ld, obj, "retry_non_idempotent", 0, &r->retry_non_idempotent);
    if (r->retry_non_idempotent && !json_object_get(obj, "upstream"))
        err_key(ld, "retry_non_idempotent", "only for routes with \"upstream\"");
    parse_methods(ld, obj, r);
    parse_target(ld, obj, r);
    parse_filters(ld, obj, &r->filters, &r->nfilters);
    r->log_sample = -1; /* the access_log's */
    get_sample(ld, obj, "log_sample", &r->log_sample);
    parse_websocket(ld, obj, r);
    return r;
}

static void check_route_names(struct load *ld)
{
    struct config *c = ld->cfg;
    struct sort_item *items = xcalloc(c->nroutes, sizeof(*items));
    for (size_t i = 0; i < c->nroutes; i++)
        items[i] = (struct sort_item){ .name = c->routes[i]->name, .index = i };
    qsort(items, c->nroutes, sizeof(*items), name_item_order);
    for (size_t k = 1, first = 0; k < c->nroutes; k++) {
        if (strcmp(items[k].name, items[first].name) != 0) {
            first = k;
            continue;
        }
        push_index(ld, items[k].index);
        err_key(ld, "name", "another route has the same name (routes[%zu])", items[first].index);
        pop(ld);
    }
    free(items);
}

static void parse_routes(struct load *ld, json_t *root)
{
    struct config *c = ld->cfg;
    json_t *arr = get_typed(ld, root, "routes", JSON_ARRAY);
    if (!json_object_get(root, "routes")) {
        err_key(ld, "routes", "required (at least one route)");
        return;
    }
    if (!arr)
        return;
    if (json_array_size(arr) == 0) {
        err_key(ld, "routes", "must not be empty");
        return;
    }
    c->routes = xcalloc(json_array_size(arr), sizeof(*c->routes));
    push_key(ld, "routes");
    for (size_t i = 0; i < json_array_size(arr); i++) {
        push_index(ld, i);
        c->routes[c->nroutes++] = parse_route(ld, json_array_get(arr, i), i);
        pop(ld);
    }
    check_route_names(ld);
    pop(ld);
}

/* Top-level sections owned by modules (module.h: global_key), and which
 * module owns each, so a build without it can say so. */
static const struct {
    const char *key, *module;
} module_sections[] = { { "jwt_providers", "jwt_auth" }, { "redis", "rate_limit" } };

static size_t module_count(void)
{
    size_t n = 0;
    while (portico_modules[n])
        n++;
    return n;
}

/* Each built module's parse_global, with its section or NULL. */
static void parse_module_globals(struct load *ld, json_t *root)
{
    size_t n = module_count();
    ld->cfg->module_globals = xcalloc(n ? n : 1, sizeof(void *));
    for (size_t i = 0; i < n; i++) {
        const struct module *m = portico_modules[i];
        if (!m->global_key || !m->parse_global)
            continue;
        json_t *v = json_object_get(root, m->global_key);
        char msg[MSG_MAX] = "";
        push_key(ld, m->global_key);
        if (m->parse_global(v, ld->path.p, &ld->cfg->module_globals[i], msg, sizeof(msg)) < 0)
            filter_error(ld, msg[0] ? msg : "invalid configuration");
        pop(ld);
    }
}

int config_upstream_same_connections(const struct config_upstream *a, const struct config_upstream *b)
{
    /* A TLS connection was verified under the old settings (CA, name):
     * new ones are made under the new. */
    if (a->tls || b->tls)
        return 0;
    return a->connect_timeout_ms == b->connect_timeout_ms && a->keepalive == b->keepalive &&
           a->keepalive_timeout_ms == b->keepalive_timeout_ms &&
           a->keepalive_requests == b->keepalive_requests;
}

int config_start_modules(struct config *c, char *err, size_t errlen)
{
    for (size_t i = 0; portico_modules[i]; i++) {
        const struct module *m = portico_modules[i];
        if (m->start_global && c->module_globals && c->module_globals[i] &&
            m->start_global(c->module_globals[i], err, errlen) < 0)
            return -1;
    }
    return 0;
}

int config_modules_ready(const struct config *c, char *why, size_t whylen)
{
    for (size_t i = 0; portico_modules[i]; i++) {
        const struct module *m = portico_modules[i];
        if (m->global_ready && c->module_globals && c->module_globals[i] &&
            !m->global_ready(c->module_globals[i], why, whylen))
            return 0;
    }
    return 1;
}

void *config_module_global(const struct config *c, const struct module *m)
{
    for (size_t i = 0; portico_modules[i]; i++)
        if (portico_modules[i] == m)
            return c->module_globals ? c->module_globals[i] : NULL;
    return NULL;
}

static void parse_root(struct load *ld, json_t *root)
{
    static const char *const fixed[] = {
        "workers", "busy_poll_us", "log_level", "listeners", "limits", "access_log", "trusted_proxies",
        "via", "upstreams", "routes", "filters", "admin", "http2",
    };
    size_t nfixed = sizeof(fixed) / sizeof(fixed[0]);
    const char *known[sizeof(fixed) / sizeof(fixed[0]) + 64 +
                      sizeof(module_sections) / sizeof(module_sections[0]) + 1];
    size_t nk = 0;
    for (size_t i = 0; i < nfixed; i++)
        known[nk++] = fixed[i];
    for (size_t i = 0; portico_modules[i] && nk < nfixed + 64; i++)
        if (portico_modules[i]->global_key)
            known[nk++] = portico_modules[i]->global_key;
    known[nk] = NULL;
    /* Sections of modules not built in: a clear error rather than "unknown". */
    for (size_t i = 0; i < sizeof(module_sections) / sizeof(module_sections[0]); i++) {
        if (in_list(known, module_sections[i].key))
            continue;
        if (json_object_get(root, module_sections[i].key))
            err_key(ld, module_sections[i].key,
                    "needs the %s module, which is not built into this binary (portico -V lists "
                    "the modules)",
                    module_sections[i].module);
        known[nk++] = module_sections[i].key; /* reported here, not again as unknown */
        known[nk] = NULL;
    }
    check_keys(ld, root, known, NULL);
    parse_workers(ld, root);
    parse_log_level(ld, root);
    parse_listeners(ld, root);
    parse_admin(ld, root);
    parse_limits(ld, root);
    parse_http2(ld, root);
    parse_access_log(ld, root);
    parse_trusted_proxies(ld, root);
    get_bool(ld, root, "via", 0, &ld->cfg->via);
    parse_upstreams(ld, root);
    parse_module_globals(ld, root);
    parse_filters(ld, root, &ld->cfg->filters, &ld->cfg->nfilters);
    parse_routes(ld, root);
}

/* ------------------------------------------------------------------ */
/* Pass 4: the line of each problem's path and of its ancestors. */

static void find_lines(struct load *ld, const char *text)
{
    size_t n = 0;
    for (size_t i = 0; i < ld->nprobs; i++)
        n += ld->probs[i].ncuts;
    if (n == 0)
        return;
    struct config_line_query *q = xcalloc(n, sizeof(*q));
    size_t nq = 0;
    for (size_t i = 0; i < ld->nprobs; i++) {
        struct problem *p = &ld->probs[i];
        for (size_t k = 0; k < p->ncuts; k++)
            q[nq++] = (struct config_line_query){ p->path, p->cuts[k], &p->lines[k] };
    }
    config_lines_find(text, q, nq);
    free(q);
}

/* ------------------------------------------------------------------ */
/* Errors out, snapshot lifetime, entry points.                         */

static void errs_add(struct config_errors *e, const char *msg)
{
    if (!e)
        return;
    e->msgs = xrealloc(e->msgs, (e->n + 1) * sizeof(*e->msgs));
    e->msgs[e->n++] = xstrdup(msg);
}

void config_errors_free(struct config_errors *e)
{
    if (!e)
        return;
    for (size_t i = 0; i < e->n; i++)
        free(e->msgs[i]);
    free(e->msgs);
    e->msgs = NULL;
    e->n = 0;
}

static int problem_line(const struct problem *p)
{
    for (size_t k = 0; k < p->ncuts; k++)
        if (p->lines[k])
            return p->lines[k];
    return 0;
}

struct emit_item {
    int line;         /* INT_MAX when unknown: those go last */
    size_t index;
};

static int emit_order(const void *a, const void *b)
{
    const struct emit_item *x = a, *y = b;
    if (x->line != y->line)
        return x->line < y->line ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* "path: message (line N)" in the order of the file, with the line of the
 * path or of its nearest ancestor found in the text. */
static void emit_problems(struct load *ld, struct config_errors *errs)
{
    struct emit_item *order = xcalloc(ld->nprobs, sizeof(*order));
    for (size_t i = 0; i < ld->nprobs; i++) {
        int line = problem_line(&ld->probs[i]);
        order[i] = (struct emit_item){ line ? line : INT_MAX, i };
    }
    qsort(order, ld->nprobs, sizeof(*order), emit_order);
    for (size_t i = 0; i < ld->nprobs; i++) {
        struct problem *p = &ld->probs[order[i].index];
        struct sbuf b = { 0 };
        if (*p->path) {
            sb_puts(&b, p->path);
            sb_puts(&b, ": ");
        }
        sb_puts(&b, p->msg);
        if (order[i].line != INT_MAX) {
            char tmp[32];
            snprintf(tmp, sizeof(tmp), " (line %d)", order[i].line);
            sb_puts(&b, tmp);
        }
        errs_add(errs, b.p);
        free(b.p);
    }
    free(order);
    if (ld->dropped) {
        char tmp[96];
        snprintf(tmp, sizeof(tmp), "... and %zu more problems", ld->dropped);
        errs_add(errs, tmp);
    }
}

static void load_free(struct load *ld)
{
    for (size_t i = 0; i < ld->nprobs; i++) {
        free(ld->probs[i].path);
        free(ld->probs[i].msg);
        free(ld->probs[i].cuts);
        free(ld->probs[i].lines);
    }
    free(ld->probs);
    for (size_t i = 0; i < ld->ntainted; i++)
        free(ld->tainted[i]);
    free(ld->tainted);
    for (size_t i = 0; i < ld->nnotes; i++)
        free(ld->notes[i].template);
    free(ld->notes);
    free(ld->marks);
    free(ld->path.p);
    free(ld->dir);
}

static void route_free(struct config_route *r)
{
    if (!r)
        return;
    free(r->name);
    free(r->host);
    free(r->path);
    for (size_t i = 0; i < r->nother_methods; i++)
        free(r->other_methods[i]);
    free(r->other_methods);
    free(r->strip_prefix);
    free(r->prefix_rewrite);
    free(r->respond_body);
    free(r->respond_content_type);
    filters_free(r->filters, r->nfilters);
    free(r);
}

static void config_free(struct config *c)
{
    if (c->router)
        router_free(c->router);
    for (size_t i = 0; i < c->nroutes; i++)
        route_free(c->routes[i]);
    free(c->routes);
    filters_free(c->filters, c->nfilters);
    if (c->module_globals) {
        for (size_t i = 0; portico_modules[i]; i++)
            if (c->module_globals[i] && portico_modules[i]->free_global)
                portico_modules[i]->free_global(c->module_globals[i]);
        free(c->module_globals);
    }
    for (size_t i = 0; i < c->nupstreams; i++) {
        for (size_t k = 0; k < c->upstreams[i].nendpoints; k++) {
            free(c->upstreams[i].endpoints[k].address);
            free(c->upstreams[i].endpoints[k].dns_host);
        }
        free(c->upstreams[i].endpoints);
        free(c->upstreams[i].name);
        tls_client_free(c->upstreams[i].tls);
        resil_upstream_free(c->upstreams[i].resil);
    }
    free(c->upstreams);
    for (size_t i = 0; i < c->nlisteners; i++) {
        free(c->listeners[i].address);
        tls_server_free(c->listeners[i].tls);
        free(c->listeners[i].client_subject_header);
        free(c->listeners[i].client_fp_header);
    }
    free(c->listeners);
    free(c->admin.address);
    free(c->admin.token);
    for (size_t i = 0; i < c->nwarnings; i++)
        free(c->warnings[i]);
    free(c->warnings);
    free(c->trusted_proxies);
    free(c->access_log.path);
    free(c->access_log.template);
    free(c->log_level);
    free(c->file);
    json_decref(c->json);
    json_decref(c->json_redacted);
    free(c);
}

struct config *config_ref(struct config *c)
{
    __atomic_add_fetch(&c->refcount, 1, __ATOMIC_RELAXED);
    return c;
}

void config_unref(struct config *c)
{
    if (c && __atomic_sub_fetch(&c->refcount, 1, __ATOMIC_ACQ_REL) == 0)
        config_free(c);
}

struct config_upstream *config_find_upstream(const struct config *c, const char *name)
{
    for (size_t i = 0; i < c->nupstreams; i++)
        if (strcmp(c->upstreams[i].name, name) == 0)
            return &c->upstreams[i];
    return NULL;
}

static char *dir_of(const char *file)
{
    const char *slash = file ? strrchr(file, '/') : NULL;
    if (!slash)
        return NULL;
    return slash == file ? xstrdup("/") : xstrndup(file, (size_t)(slash - file));
}

/* Names whose literal values are secrets even when written inline. */
static int secret_key(const char *k)
{
    static const char *const words[] = { "password", "secret", "token", "private", NULL };
    for (const char *const *w = words; *w; w++)
        if (strcasestr(k, *w))
            return 1;
    return 0;
}

/* A copy of the document for the admin API's /config: a value that came
 * from ${VAR} or @file shows its template ("${JWT_SECRET}"), and the
 * string value of a secret-sounding key shows "<redacted>". */
static json_t *redacted_copy(const struct load *ld, const json_t *v, int secret)
{
    if (json_is_object(v)) {
        json_t *o = json_object();
        const char *k;
        json_t *m;
        json_object_foreach((json_t *)v, k, m)
            json_object_set_new(o, k, redacted_copy(ld, m, secret_key(k)));
        return o;
    }
    if (json_is_array(v)) {
        json_t *a = json_array();
        size_t i;
        json_t *m;
        json_array_foreach(v, i, m)
            json_array_append_new(a, redacted_copy(ld, m, secret));
        return a;
    }
    if (json_is_string(v)) {
        const struct subst_note *n = find_note(ld, v);
        if (n)
            return json_string(n->template);
        if (secret && json_string_length(v))
            return json_string("<redacted>");
    }
    return json_deep_copy(v);
}

struct config *config_load_string(const char *text, const char *file, struct config_errors *errs)
{
    json_error_t jerr;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        char msg[256];
        snprintf(msg, sizeof(msg), "line %d, column %d: %s", jerr.line, jerr.column, jerr.text);
        errs_add(errs, msg);
        return NULL;
    }

    struct load ld = { 0 };
    struct config *c = xcalloc(1, sizeof(*c));
    c->refcount = 1;
    c->file = file ? xstrdup(file) : NULL;
    c->json = root;
    ld.cfg = c;
    ld.dir = dir_of(file);

    if (!json_is_object(root)) {
        err(&ld, "the configuration must be a JSON object, got %s", type_name(root));
    } else {
        subst_walk(&ld, root);
        if (ld.nnotes)
            qsort(ld.notes, ld.nnotes, sizeof(*ld.notes), note_cmp);
        parse_root(&ld, root);
    }
    if (ld.nprobs == 0 && ld.dropped == 0) {
        char why[256] = "";
        c->router = router_build(c->routes, c->nroutes, why, sizeof(why));
        if (!c->router)
            err_key(&ld, "routes", "%s", *why ? why : "cannot build the route table");
    }
    if (ld.nprobs || ld.dropped) {
        find_lines(&ld, text);
        emit_problems(&ld, errs);
        config_free(c);
        c = NULL;
    } else {
        c->json_redacted = redacted_copy(&ld, root, 0);
    }
    load_free(&ld);
    return c;
}

/* Read a whole regular file of at most CONFIG_FILE_MAX bytes into b.
 * Returns NULL, or a static reason. */
static const char *read_config_file(const char *file, struct sbuf *b)
{
    static __thread char why[160];
    int fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        snprintf(why, sizeof(why), "cannot open: %s", strerror(errno));
        if (fd >= 0)
            close(fd);
        return why;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return "not a regular file";
    }
    sb_reserve(b, (size_t)st.st_size);
    for (;;) {
        sb_reserve(b, 4096);
        ssize_t r = read(fd, b->p + b->len, b->cap - b->len - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            snprintf(why, sizeof(why), "cannot read: %s", strerror(errno));
            close(fd);
            return why;
        }
        if (r == 0)
            break;
        b->len += (size_t)r;
        if (b->len > CONFIG_FILE_MAX) {
            close(fd);
            return "larger than 16 MiB";
        }
    }
    close(fd);
    b->p[b->len] = '\0';
    return memchr(b->p, '\0', b->len) ? "contains a NUL byte" : NULL;
}

struct config *config_load(const char *file, struct config_errors *errs)
{
    struct sbuf b = { 0 };
    struct config *c = NULL;
    const char *why = read_config_file(file, &b);
    if (why)
        errs_add(errs, why);
    else
        c = config_load_string(b.p, file, errs);
    free(b.p);
    return c;
}

/* config_internal.h: problem recording for the other config*.c files. */
void config_err(struct load *ld, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    verr(ld, fmt, ap);
    va_end(ap);
}
void config_push_key(struct load *ld, const char *key)
{
    push_key(ld, key);
}
void config_push_index(struct load *ld, size_t i)
{
    push_index(ld, i);
}
void config_pop(struct load *ld)
{
    pop(ld);
}
const char *config_show(const struct load *ld, const json_t *v, char *buf, size_t cap)
{
    return show(ld, v, buf, cap);
}
