/* request_id: give every request an id and carry a W3C trace context.
 *
 * Config: {} or {"header": "X-Request-Id", "trust_incoming": true,
 *               "traceparent": true, "sampled": false}
 *
 * The id: a valid incoming one (1..128 characters of [A-Za-z0-9._:-]) is
 * kept when trust_incoming is true; anything else is replaced by 128 random
 * bits as 32 lowercase hex digits. It is set on the upstream request and on
 * the response (local answers too), and shared as the request variable
 * "request_id" and the access-log field of the same name.
 *
 * traceparent (https://www.w3.org/TR/trace-context/): a valid incoming one
 * keeps its trace-id and flags and gets a new parent-id (this hop's span);
 * an absent or invalid one starts a new trace (flags 01 when "sampled",
 * else 00). tracestate passes through untouched. The trace-id is shared as
 * the variable and log field "trace_id".
 *
 * Randomness: a per-thread xoshiro256** generator seeded once from
 * getrandom(); ids need to be unique, not secret. */
#include "module.h"
#include "log.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#define ID_MAX          128
#define TRACEPARENT_LEN 55 /* "00-" 32 "-" 16 "-" 2 */
/* RFC 9110 token characters, for the header name. */
#define TCHARS "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"

struct rid_config {
    char *header;
    bool trust_incoming;
    bool traceparent;
    bool sampled;
};

/* ---- randomness ---------------------------------------------------------- */

static __thread uint64_t rng_state[4];
static __thread bool rng_seeded;

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Seed from the kernel; if getrandom() is unavailable, fall back to the
 * clock and the thread's address space (unique enough for ids). */
static void rng_seed(void)
{
    uint64_t seed[4];
    if (getrandom(seed, sizeof(seed), 0) != (ssize_t)sizeof(seed)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t x = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
        x ^= (uint64_t)(uintptr_t)&rng_state;
        for (int i = 0; i < 4; i++)
            seed[i] = splitmix64(&x);
    }
    memcpy(rng_state, seed, sizeof(seed));
    if (!(rng_state[0] | rng_state[1] | rng_state[2] | rng_state[3]))
        rng_state[0] = 1; /* the all-zero state is a fixed point */
    rng_seeded = true;
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(void)
{
    if (!rng_seeded)
        rng_seed();
    uint64_t *s = rng_state;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* Write 16 lowercase hex digits of a non-zero random value (W3C ids must
 * not be all zero). No terminator. */
static void hex16_random(char *out)
{
    static const char digits[] = "0123456789abcdef";
    uint64_t v;
    do
        v = rng_next();
    while (v == 0);
    for (int i = 14; i >= 0; i -= 2, v >>= 8) {
        out[i] = digits[(v >> 4) & 15];
        out[i + 1] = digits[v & 15];
    }
}

/* ---- validation ------------------------------------------------------------ */

static bool id_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == ':' || c == '-';
}

static bool id_valid(const char *s, size_t len)
{
    if (len == 0 || len > ID_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!id_char((unsigned char)s[i]))
            return false;
    return true;
}

/* Lowercase hex only, as the spec requires; all zero is reported through
 * *zero. */
static bool lowhex(const char *s, size_t n, bool *zero)
{
    *zero = true;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return false;
        if (c != '0')
            *zero = false;
    }
    return true;
}

/* Parse a traceparent value. On success copy the 32-digit trace-id and the
 * 2-digit flags out and return true. Version 00 must be exactly 55 bytes; a
 * later version (not ff) may carry more fields after a '-', which are
 * ignored, and only its sampled bit is kept since the other bits may mean
 * something version 00 does not know. */
static bool traceparent_parse(const char *v, size_t len, char trace[32], char flags[2])
{
    bool zero;
    if (len < TRACEPARENT_LEN || !lowhex(v, 2, &zero) || v[2] != '-' || v[35] != '-' ||
        v[52] != '-')
        return false;
    bool v00 = v[0] == '0' && v[1] == '0';
    if (v[0] == 'f' && v[1] == 'f')
        return false;
    if (v00 ? len != TRACEPARENT_LEN : (len > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != '-'))
        return false;
    if (!lowhex(v + 3, 32, &zero) || zero)
        return false;
    if (!lowhex(v + 36, 16, &zero) || zero)
        return false;
    if (!lowhex(v + 53, 2, &zero))
        return false;
    memcpy(trace, v + 3, 32);
    if (v00) {
        memcpy(flags, v + 53, 2);
    } else {
        int low = v[54] <= '9' ? v[54] - '0' : v[54] - 'a' + 10;
        flags[0] = '0';
        flags[1] = (char)('0' + (low & 1));
    }
    return true;
}

/* ---- config ---------------------------------------------------------------- */

/* Fields the core or the trace context own. */
static const char *const reserved_names[] = {
    "traceparent", "tracestate", "Content-Length", "Transfer-Encoding", "Connection",       "Host",
    "Keep-Alive",  "TE",         "Trailer",        "Upgrade",           "Proxy-Connection", NULL,
};

static int get_bool(json_t *json, const char *key, bool *out, const char *path, char *err,
                    size_t errlen)
{
    json_t *v = json_object_get(json, key);
    if (!v)
        return 0;
    if (!json_is_boolean(v)) {
        snprintf(err, errlen, "%s.%s: expected true or false", path, key);
        return -1;
    }
    *out = json_is_true(v);
    return 0;
}

static void rid_free_config(void *p)
{
    struct rid_config *c = p;
    if (c) {
        free(c->header);
        free(c);
    }
}

static int rid_parse_config(json_t *json, const char *path, void *gcfg, void **out, char *err, size_t errlen)
{
    (void)gcfg;
    if (!json_is_object(json)) {
        snprintf(err, errlen, "%s: expected an object like {} or {\"header\": \"X-Request-Id\"}",
                 path);
        return -1;
    }
    const char *key;
    json_t *val;
    json_object_foreach(json, key, val)
    {
        if (strcmp(key, "header") && strcmp(key, "trust_incoming") && strcmp(key, "traceparent") &&
            strcmp(key, "sampled")) {
            snprintf(err, errlen,
                     "%s: unknown key \"%.64s\" (expected header, trust_incoming, "
                     "traceparent, sampled)",
                     path, key);
            return -1;
        }
    }
    struct rid_config c = { .trust_incoming = true, .traceparent = true };
    if (get_bool(json, "trust_incoming", &c.trust_incoming, path, err, errlen) < 0 ||
        get_bool(json, "traceparent", &c.traceparent, path, err, errlen) < 0 ||
        get_bool(json, "sampled", &c.sampled, path, err, errlen) < 0)
        return -1;
    const char *name = "X-Request-Id";
    json_t *h = json_object_get(json, "header");
    if (h) {
        if (!json_is_string(h) || json_string_length(h) == 0 ||
            strspn(json_string_value(h), TCHARS) != json_string_length(h)) {
            snprintf(err, errlen,
                     "%s.header: expected a header name (letters, digits and "
                     "!#$%%&'*+-.^_`|~)",
                     path);
            return -1;
        }
        name = json_string_value(h);
        for (size_t i = 0; reserved_names[i]; i++) {
            if (!strcasecmp(name, reserved_names[i])) {
                snprintf(err, errlen, "%s.header: \"%s\" cannot carry the request id", path,
                         reserved_names[i]);
                return -1;
            }
        }
    }
    struct rid_config *cfg = xmalloc(sizeof(*cfg));
    *cfg = c;
    cfg->header = xstrdup(name);
    *out = cfg;
    return 0;
}

/* ---- hooks ----------------------------------------------------------------- */

static void trace_start(struct request *r, const struct rid_config *cfg)
{
    char trace[32], flags[2] = { '0', cfg->sampled ? '1' : '0' };
    size_t len;
    const char *in = request_header(r, "traceparent", &len);
    if (!in || !traceparent_parse(in, len, trace, flags)) {
        hex16_random(trace);
        hex16_random(trace + 16);
    }
    char *tp = request_alloc(r, TRACEPARENT_LEN + 1);
    memcpy(tp, "00-", 3);
    memcpy(tp + 3, trace, 32);
    tp[35] = '-';
    hex16_random(tp + 36);
    tp[52] = '-';
    memcpy(tp + 53, flags, 2);
    request_set_header(r, "traceparent", tp);
    tp[35] = '\0'; /* the trace-id, for the variable and log (both copy) */
    request_var_set(r, "trace_id", tp + 3);
    request_log_field(r, "trace_id", tp + 3);
}

static enum filter_status rid_on_request(struct request *r, void *p, void **ctx)
{
    const struct rid_config *cfg = p;
    size_t len = 0;
    const char *in = cfg->trust_incoming ? request_header(r, cfg->header, &len) : NULL;
    char *id;
    if (in && id_valid(in, len)) {
        id = request_alloc(r, len + 1);
        memcpy(id, in, len);
    } else {
        id = request_alloc(r, 33);
        hex16_random(id);
        hex16_random(id + 16);
    }
    *ctx = id;
    request_set_header(r, cfg->header, id);
    request_var_set(r, "request_id", id);
    request_log_field(r, "request_id", id);
    if (cfg->traceparent)
        trace_start(r, cfg);
    return FILTER_CONTINUE;
}

static enum filter_status rid_on_response(struct request *r, void *p, void **ctx)
{
    const struct rid_config *cfg = p;
    if (*ctx)
        response_set_header(r, cfg->header, *ctx);
    return FILTER_CONTINUE;
}

const struct module module_request_id = {
    .name = "request_id",
    .parse_config = rid_parse_config,
    .free_config = rid_free_config,
    .on_request = rid_on_request,
    .on_response = rid_on_response,
};
