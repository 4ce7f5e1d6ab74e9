/* rate_limit: GCRA limits per key, in process or shared through Redis.
 *
 *   "redis": { "address": "127.0.0.1:6379", "password": "...", "db": 0,
 *              "timeout_ms": 50, ... }                 (top level; optional)
 *   { "rate_limit": { "key": "jwt:sub+route", "rate": "100/m", "burst": 20 } }
 *   { "rate_limit": { "limits": [ { "key": "jwt:sub", "rate": "100/m" },
 *                                 { "key": "route", "rate": "5000/s" } ],
 *                     "on_missing": "fallback", "fallback_key": "ip",
 *                     "on_redis_error": "local", "headers": true } }
 *
 * The arithmetic (and its exact semantics) is in rate_limit_gcra.h. A
 * request passes when every limit of the filter lets it pass; then every
 * limit is charged, atomically (one shard-locked step locally, one Lua
 * script in Redis); a refused request charges nothing.
 *
 * Keys: the parts of a key expression are read from the request and
 * hashed (the limit's expression and each value, length-prefixed): with
 * SHA-256 for Redis, with SipHash under a random key for the local table.
 * Keys have a fixed size, and header values (API keys, say) are never
 * stored in clear. In Redis a bucket is
 * "<prefix>{<hash of the key>}:<limit id>": limits of one request that use
 * the same key expression share one hash slot (Redis Cluster).
 *
 * Local backend: one table per filter (rate_limit_local.h), shared by all
 * workers, exact across them, its memory fixed by local_max_keys.
 *
 * Redis backend: each worker thread keeps its own asynchronous hiredis
 * connection on its own event loop, made on first use for each loaded
 * config (so a reload gets new connections; the old ones close within a
 * second of the old config being dropped, from the worker's own loop).
 * Connection states of a worker:
 *
 *   DOWN --retry timer--> [ASKING sentinel] --master addr--> CONNECTING
 *   CONNECTING --AUTH, SELECT, (ROLE), SCRIPT LOAD answered--> READY
 *   any --error, disconnect, connect timeout--> DOWN (retry after backoff)
 *
 *   READY, degraded, probe unanswered for connect_timeout_ms --> DOWN
 *
 * The requests a worker reads in one loop turn join one batch (at most
 * batch_max; rate_limit_batch.h), decided by one script call sent when the
 * turn ends (the flush event, made active by the turn's first request,
 * runs after the turn's other events): Redis pays its per-call cost once
 * per batch, and a hot key once per batch. With max_calls_in_flight, a
 * worker with that many calls unanswered holds its batch until one lands
 * (or times out), so under load it grows instead of the calls
 * multiplying; a full batch goes at once. With batch_linger_us, a batch
 * begun while a call is in flight also waits that long from its first
 * request (a request that finds nothing in flight never waits). A call is
 * written in the turn it is sent, without an epoll change
 * (rate_limit_events.h). Batches are sent while CONNECTING
 * or READY (hiredis queues them behind the setup commands), or wait in the
 * worker's list while ASKING, unless the worker is "degraded": a call
 * timed out or the connection failed.
 * Degraded, requests take the on_redis_error path at once, without waiting,
 * and a probe (EVALSHA of the script with no keys) goes out every
 * RL_PROBE_MS until Redis answers. A degraded episode is logged once per
 * process when it starts and once when it ends. A refusal from Redis is
 * remembered by the worker until it expires (the memo), so a key known to
 * be over costs Redis nothing. Every request waiting on Redis has a cleanup
 * and its batch a timer; a sent batch belongs to hiredis, whose callback
 * always runs (with no reply when the connection goes) and frees it; a
 * request that stops waiting only clears its slot in the batch. A
 * worker's connections are closed on its own thread: at thread exit (a
 * pthread key destructor, before the loop's base is freed) or by the 1 s
 * tick once the config that made them is dropped. */
#include "module.h"
#include "log.h"
#include "rate_limit_batch.h"
#include "rate_limit_events.h"
#include "rate_limit_local.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <event2/event.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#define RL_MAX_PARTS 8
#define RL_DIGEST    16 /* bytes of SHA-256 kept for a key */
#define RL_PROBE_MS  100
#define RL_TICK_MS   1000
#define RL_BODY_429  "{\"error\":\"rate_limited\",\"status\":429}"
#define RL_BODY_503  "{\"error\":\"rate_limit_unavailable\",\"status\":503}"

/* Decides a batch of requests in order, as if each had its own call at the
 * same instant (the layout of the call and of the answer is in
 * rate_limit_batch.h): the rule of rate_limit_gcra.h in microseconds of
 * Redis' own clock (TIME, read once), so every instance shares one clock.
 * Each key is read once and, when charged, written once, with an expiry at
 * its full recovery; a refused request charges nothing. A batch of one key
 * under one policy (one hot client, a per-route limit) takes a shorter way
 * with GET instead of MGET and no tables. Numbers go to Redis as strings
 * made with %d: Redis 7.0 and Lua format a bare number with printf's
 * floating-point path (%.17g, %.14g), which was a tenth of a call. */
static const char RL_SCRIPT[] =
    "local t = redis.call('TIME')\n"
    "local now = t[1] * 1000000 + t[2]\n"
    "local np = tonumber(ARGV[1]) or 0\n"
    "local plan = ARGV[2 * np + 2] or ''\n"
    "local byte, fmt, ceil = string.byte, string.format, math.ceil\n"
    "local out, o, pos, len = {}, 0, 1, #plan\n"
    "if np == 1 and #KEYS == 1 then\n"
    "  local iv = ARGV[2] + 0\n"
    "  local cap = iv * ARGV[3]\n"
    "  local tat = tonumber(redis.call('GET', KEYS[1])) or now\n"
    "  if tat < now then tat = now end\n"
    "  local was = tat\n"
    "  while pos <= len do\n"
    "    local n = byte(plan, pos)\n"
    "    if tat - now + iv > cap then\n"
    "      local r = -1 - (tat - now) * 1000\n"
    "      for j = 1, n do out[o + j] = r end\n"
    "    else\n"
    "      for j = 1, n do\n"
    "        out[o + j] = (tat - now) * 1000\n"
    "        tat = tat + iv\n"
    "      end\n"
    "    end\n"
    "    o = o + n\n"
    "    pos = pos + 1 + 4 * n\n"
    "  end\n"
    "  if tat ~= was then\n"
    "    redis.call('SET', KEYS[1], fmt('%d', tat + 0.5), 'PX', fmt('%d', ceil((tat - now) / 1000)))\n"
    "  end\n"
    "  return out\n"
    "end\n"
    "local iv, cap, tat, dirty = {}, {}, {}, {}\n"
    "for p = 1, np do\n"
    "  local v = ARGV[2 * p] + 0\n"
    "  iv[p] = v\n"
    "  cap[p] = v * ARGV[2 * p + 1]\n"
    "end\n"
    "if #KEYS > 0 then\n"
    "  local got = redis.call('MGET', unpack(KEYS))\n"
    "  for k = 1, #KEYS do\n"
    "    local v = tonumber(got[k]) or now\n"
    "    if v < now then v = now end\n"
    "    tat[k] = v\n"
    "  end\n"
    "end\n"
    "while pos <= len do\n"
    "  local n = byte(plan, pos)\n"
    "  if n == 1 then\n"
    "    local kh, kl, ph, pl = byte(plan, pos + 1, pos + 4)\n"
    "    local k, p = kh * 256 + kl, ph * 256 + pl\n"
    "    local t = tat[k]\n"
    "    if t - now + iv[p] > cap[p] then\n"
    "      out[o + 1] = -1 - (t - now) * 1000\n"
    "    else\n"
    "      out[o + 1] = (t - now) * 1000\n"
    "      tat[k] = t + iv[p]\n"
    "      dirty[k] = true\n"
    "    end\n"
    "    o = o + 1\n"
    "    pos = pos + 5\n"
    "  else\n"
    "    local ok, q = true, pos + 1\n"
    "    for j = 1, n do\n"
    "      local kh, kl, ph, pl = byte(plan, q, q + 3)\n"
    "      local p = ph * 256 + pl\n"
    "      if tat[kh * 256 + kl] - now + iv[p] > cap[p] then ok = false end\n"
    "      q = q + 4\n"
    "    end\n"
    "    q = pos + 1\n"
    "    for j = 1, n do\n"
    "      local kh, kl, ph, pl = byte(plan, q, q + 3)\n"
    "      local k = kh * 256 + kl\n"
    "      local ahead = (tat[k] - now) * 1000\n"
    "      if ok then\n"
    "        out[o + j] = ahead\n"
    "        tat[k] = tat[k] + iv[ph * 256 + pl]\n"
    "        dirty[k] = true\n"
    "      else\n"
    "        out[o + j] = -1 - ahead\n"
    "      end\n"
    "      q = q + 4\n"
    "    end\n"
    "    o = o + n\n"
    "    pos = q\n"
    "  end\n"
    "end\n"
    "for k = 1, #KEYS do\n"
    "  if dirty[k] then\n"
    "    local v = tat[k]\n"
    "    redis.call('SET', KEYS[k], fmt('%d', v + 0.5), 'PX', fmt('%d', ceil((v - now) / 1000)))\n"
    "  end\n"
    "end\n"
    "return out\n";

/* ---- config types ------------------------------------------------------- */

enum rl_part_kind { PART_IP, PART_HEADER, PART_JWT, PART_ROUTE, PART_CONST };

struct rl_part {
    enum rl_part_kind kind;
    char *arg; /* header name, request variable "jwt.CLAIM", or constant */
};

struct rl_keyexpr {
    char *text; /* as configured: hashed in, so different expressions never share */
    struct rl_part parts[RL_MAX_PARTS];
    size_t nparts;
};

struct rl_limit {
    struct rl_keyexpr key, fallback;
    int has_fallback;
    struct gcra_policy gcra; /* nanoseconds */
    char interval_us[32];    /* for the script */
    char burst_s[24];
    char *id;      /* bucket name suffix in Redis */
    char *policy;  /* "b;w=W" */
    uint64_t salt; /* told apart in the local table and the memo */
};

enum rl_on_error { ON_ERR_LOCAL, ON_ERR_ALLOW, ON_ERR_DENY };

/* The "redis" section; shared read-only, reference-counted: the config
 * holds one reference, each worker connection state another. */
struct rl_redis {
    int refs; /* atomic */
    int dead; /* atomic: the config dropped it; workers close their connections */
    char *host, *unix_path;
    int port;
    struct rl_hostport {
        char *host;
        int port;
    } * sentinels;
    size_t nsentinels;
    char *master_name;
    char *username, *password;
    int db;
    int timeout_ms, connect_timeout_ms, reconnect_min_ms, reconnect_max_ms;
    int max_pending, memo_size, batch_max, max_calls_in_flight, batch_linger_us;
    char *prefix;
    char *label; /* for logs: where Redis is; never a password */
    char sha[41];
    int degraded_workers; /* atomic: episode logging */
    uint64_t fallbacks;   /* atomic */
};

struct rl_config {
    struct rl_limit limits[RL_MAX_LIMITS];
    size_t nlimits;
    struct rl_redis *redis; /* NULL: local backend */
    enum rl_on_error on_error;
    int headers;
    char *policy; /* RateLimit-Policy: every limit's */
    struct rl_table *table;
};

/* ---- small helpers ------------------------------------------------------ */

static int rl_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int rl_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static uint64_t rl_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t rl_mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static int rl_check_keys(json_t *obj, const char *path, const char *const *known, char *err,
                         size_t errlen)
{
    const char *key;
    json_t *v;
    json_object_foreach (obj, key, v) {
        size_t i = 0;
        while (known[i] && strcmp(key, known[i]) != 0)
            i++;
        if (!known[i])
            return rl_err(err, errlen, "%s.%s: unknown key", path, key);
    }
    return 0;
}

static int rl_get_int(json_t *obj, const char *path, const char *key, long long min, long long max,
                      int *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max)
        return rl_err(err, errlen, "%s.%s: must be an integer from %lld to %lld", path, key, min,
                      max);
    *out = (int)json_integer_value(v);
    return 0;
}

static int rl_get_str(json_t *obj, const char *path, const char *key, const char **out, char *err,
                      size_t errlen)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return 0;
    if (!json_is_string(v))
        return rl_err(err, errlen, "%s.%s: must be a string", path, key);
    *out = json_string_value(v);
    return 0;
}

static const EVP_MD *rl_md_sha256, *rl_md_sha1;
static uint64_t rl_sip_k0, rl_sip_k1; /* random per process: local keys, digest cache */
static pthread_once_t rl_md_once = PTHREAD_ONCE_INIT;
static void rl_md_init(void)
{
    rl_md_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    rl_md_sha1 = EVP_MD_fetch(NULL, "SHA1", NULL);
    if (!rl_md_sha256 || !rl_md_sha1)
        die("rate_limit: OpenSSL has no SHA-256/SHA-1");
    uint64_t k[2];
    if (getrandom(k, sizeof(k), 0) != sizeof(k))
        die("rate_limit: getrandom failed");
    rl_sip_k0 = k[0];
    rl_sip_k1 = k[1];
}

static void rl_digest(const EVP_MD *md, const void *data, size_t len, unsigned char *out)
{
    unsigned int n = 0;
    if (!EVP_Digest(data, len, out, &n, md, NULL))
        die("rate_limit: digest failed");
}

static void rl_hex(const unsigned char *p, size_t n, char *out)
{
    static const char hx[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hx[p[i] >> 4];
        out[2 * i + 1] = hx[p[i] & 15];
    }
    out[2 * n] = '\0';
}

/* ---- parsing a limit ---------------------------------------------------- */

static int rl_tchar(int c)
{
    return isalnum(c) || (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* "ip", "route", "header:NAME", "jwt:CLAIM", "const:TEXT" joined by '+'. */
static int rl_parse_keyexpr(const char *s, const char *path, const char *key, struct rl_keyexpr *k,
                            char *err, size_t errlen)
{
    if (!*s)
        return rl_err(err, errlen, "%s.%s: must not be empty", path, key);
    k->text = xstrdup(s);
    const char *p = s;
    while (*p) {
        const char *end = strchr(p, '+');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (k->nparts == RL_MAX_PARTS)
            return rl_err(err, errlen, "%s.%s: at most %d parts", path, key, RL_MAX_PARTS);
        struct rl_part *pt = &k->parts[k->nparts];
        char *word = xstrndup(p, n);
        char *colon = strchr(word, ':');
        const char *arg = colon ? colon + 1 : NULL;
        if (colon)
            *colon = '\0';
        int bad = 0;
        if (strcmp(word, "ip") == 0 && !arg) {
            pt->kind = PART_IP;
        } else if (strcmp(word, "route") == 0 && !arg) {
            pt->kind = PART_ROUTE;
        } else if (strcmp(word, "header") == 0 && arg && *arg) {
            pt->kind = PART_HEADER;
            for (const char *c = arg; *c; c++)
                bad |= !rl_tchar((unsigned char)*c);
            pt->arg = xstrdup(arg);
        } else if (strcmp(word, "jwt") == 0 && arg && *arg) {
            pt->kind = PART_JWT;
            for (const char *c = arg; *c; c++)
                bad |= !(isalnum((unsigned char)*c) || *c == '_' || *c == '-' || *c == '.');
            pt->arg = xmalloc(strlen(arg) + 5);
            sprintf(pt->arg, "jwt.%s", arg);
        } else if (strcmp(word, "const") == 0 && arg && *arg) {
            pt->kind = PART_CONST;
            pt->arg = xstrdup(arg);
        } else {
            bad = 1;
        }
        free(word);
        if (bad) {
            free(pt->arg);
            pt->arg = NULL;
        }
        if (bad)
            return rl_err(err, errlen,
                          "%s.%s: \"%.*s\" is not a key part (ip, route, header:NAME, jwt:CLAIM, "
                          "const:TEXT, joined by '+')",
                          path, key, (int)n, p);
        k->nparts++;
        if (!end)
            break;
        p = end + 1;
        if (!*p)
            return rl_err(err, errlen, "%s.%s: ends with '+'", path, key);
    }
    return 0;
}

static void rl_keyexpr_free(struct rl_keyexpr *k)
{
    for (size_t i = 0; i < k->nparts; i++)
        free(k->parts[i].arg);
    free(k->text);
}

/* "N/UNIT" or "N/KUNIT", UNIT one of s, m, h, d: *period_ns and *count. */
static int rl_parse_rate(const char *s, uint64_t *count, uint64_t *period_ns)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    if (errno || end == s || !isdigit((unsigned char)*s) || *end != '/' || n == 0 ||
        n > 1000000000ULL)
        return -1;
    const char *u = end + 1;
    unsigned long long mult = 1;
    if (isdigit((unsigned char)*u)) {
        mult = strtoull(u, &end, 10);
        if (mult == 0 || mult > 1000000)
            return -1;
        u = end;
    }
    uint64_t unit;
    if (strcmp(u, "s") == 0)
        unit = 1;
    else if (strcmp(u, "m") == 0)
        unit = 60;
    else if (strcmp(u, "h") == 0)
        unit = 3600;
    else if (strcmp(u, "d") == 0)
        unit = 86400;
    else
        return -1;
    if (mult * unit > 7 * 86400)
        return -1;
    *count = n;
    *period_ns = mult * unit * 1000000000ULL;
    return 0;
}

static const char *const limit_keys[] = { "key",        "rate",         "burst", "name",
                                          "on_missing", "fallback_key", NULL };

/* One limit from obj (the filter itself in the short form, or an entry
 * of "limits"); dflt supplies on_missing/fallback_key not given here. */
static int rl_parse_limit(json_t *obj, json_t *dflt, const char *path, struct rl_limit *l,
                          char *err, size_t errlen)
{
    const char *key = NULL, *rate = NULL, *name = NULL, *on_missing = NULL, *fb = NULL;
    if (rl_get_str(obj, path, "key", &key, err, errlen) < 0 ||
        rl_get_str(obj, path, "rate", &rate, err, errlen) < 0 ||
        rl_get_str(obj, path, "name", &name, err, errlen) < 0 ||
        rl_get_str(obj, path, "on_missing", &on_missing, err, errlen) < 0 ||
        rl_get_str(obj, path, "fallback_key", &fb, err, errlen) < 0)
        return -1;
    if (dflt && !on_missing && rl_get_str(dflt, path, "on_missing", &on_missing, err, errlen) < 0)
        return -1;
    int fb_here = fb != NULL;
    if (dflt && !fb && rl_get_str(dflt, path, "fallback_key", &fb, err, errlen) < 0)
        return -1;
    if (!key)
        return rl_err(err, errlen, "%s.key: required (e.g. \"ip\" or \"jwt:sub+route\")", path);
    if (!rate)
        return rl_err(err, errlen, "%s.rate: required (e.g. \"100/s\", \"6000/m\")", path);
    if (rl_parse_keyexpr(key, path, "key", &l->key, err, errlen) < 0)
        return -1;
    uint64_t count, period;
    if (rl_parse_rate(rate, &count, &period) < 0)
        return rl_err(err, errlen,
                      "%s.rate: must be COUNT/PERIOD: COUNT from 1 to 1000000000, PERIOD s, m, h "
                      "or d, optionally with a multiplier (\"10/5m\"), at most 7 days",
                      path);
    uint64_t interval = period / count;
    if (interval < 1000)
        return rl_err(err, errlen, "%s.rate: at most 1000000 per second", path);
    uint64_t burst = count;
    json_t *b = json_object_get(obj, "burst");
    if (b) {
        if (!json_is_integer(b) || json_integer_value(b) < 1 || json_integer_value(b) > 1000000000)
            return rl_err(err, errlen, "%s.burst: must be an integer from 1 to 1000000000", path);
        burst = (uint64_t)json_integer_value(b);
    }
    if (burst > (UINT64_C(1) << 62) / interval)
        return rl_err(err, errlen, "%s.burst: burst times the interval exceeds 146 years", path);
    l->gcra.interval = interval;
    l->gcra.burst = burst;
    snprintf(l->interval_us, sizeof(l->interval_us), "%.3f", (double)interval / 1000.0);
    snprintf(l->burst_s, sizeof(l->burst_s), "%llu", (unsigned long long)burst);
    uint64_t w_s = (interval * burst + 999999999ULL) / 1000000000ULL;
    char pol[64];
    snprintf(pol, sizeof(pol), "%llu;w=%llu", (unsigned long long)burst, (unsigned long long)w_s);
    l->policy = xstrdup(pol);

    if (!on_missing || strcmp(on_missing, "fallback") == 0) {
        l->has_fallback = 1;
        if (rl_parse_keyexpr(fb ? fb : "ip", path, "fallback_key", &l->fallback, err, errlen) < 0)
            return -1;
    } else if (strcmp(on_missing, "skip") == 0) {
        if (fb_here)
            return rl_err(err, errlen, "%s.fallback_key: only with \"on_missing\": \"fallback\"",
                          path);
    } else {
        return rl_err(err, errlen, "%s.on_missing: must be \"skip\" or \"fallback\"", path);
    }

    if (name) {
        size_t n = strlen(name);
        int ok = n >= 1 && n <= 64;
        for (size_t i = 0; ok && i < n; i++)
            ok = isalnum((unsigned char)name[i]) || strchr("_-.:", name[i]);
        if (!ok)
            return rl_err(err, errlen, "%s.name: must be 1 to 64 letters, digits, '_-.:'", path);
        l->id = xstrdup(name);
    } else {
        /* Limits with the same key expression, rate and burst share their
         * buckets in Redis (across routes and instances); "name" separates. */
        unsigned char d[32];
        char hx[17], id[128];
        rl_digest(rl_md_sha256, key, strlen(key), d);
        rl_hex(d, 8, hx);
        snprintf(id, sizeof(id), "%s:%llu:%llu", hx, (unsigned long long)interval,
                 (unsigned long long)burst);
        l->id = xstrdup(id);
    }
    if (getrandom(&l->salt, sizeof(l->salt), 0) != sizeof(l->salt))
        l->salt = rl_mix((uint64_t)(uintptr_t)l ^ rl_now_ns());
    return 0;
}

/* ---- the redis section -------------------------------------------------- */

static void rl_redis_unref(struct rl_redis *rc)
{
    if (!rc || __atomic_sub_fetch(&rc->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    free(rc->host);
    free(rc->unix_path);
    for (size_t i = 0; i < rc->nsentinels; i++)
        free(rc->sentinels[i].host);
    free(rc->sentinels);
    free(rc->master_name);
    free(rc->username);
    if (rc->password) {
        explicit_bzero(rc->password, strlen(rc->password));
        free(rc->password);
    }
    free(rc->prefix);
    free(rc->label);
    free(rc);
}

/* "IP:PORT", "[IPv6]:PORT" or "localhost:PORT": numeric, so that connecting
 * never resolves a name on a worker's loop. */
static int rl_parse_hostport(const char *s, char **host, int *port)
{
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s)
        return -1;
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || p < 1 || p > 65535)
        return -1;
    const char *h = s;
    size_t hl = (size_t)(colon - s);
    if (h[0] == '[') {
        if (hl < 3 || h[hl - 1] != ']')
            return -1;
        h++;
        hl -= 2;
    }
    char buf[64];
    if (hl >= sizeof(buf))
        return -1;
    memcpy(buf, h, hl);
    buf[hl] = '\0';
    unsigned char a[16];
    if (strcmp(buf, "localhost") == 0)
        strcpy(buf, "127.0.0.1");
    else if (inet_pton(AF_INET, buf, a) != 1 && inet_pton(AF_INET6, buf, a) != 1)
        return -1;
    *host = xstrdup(buf);
    *port = (int)p;
    return 0;
}

static int rl_parse_global(json_t *json, const char *path, void **gcfg, char *err, size_t errlen)
{
    pthread_once(&rl_md_once, rl_md_init);
    *gcfg = NULL;
    if (!json)
        return 0; /* no Redis: filters use the local backend */
    if (!json_is_object(json))
        return rl_err(err, errlen, "%s: must be an object", path);
    static const char *const known[] = {
        "address",          "sentinels",          "master_name",
        "username",         "password",           "db",
        "timeout_ms",       "connect_timeout_ms", "key_prefix",
        "reconnect_min_ms", "reconnect_max_ms",   "max_pending",
        "memo_size",        "batch_max",          "max_calls_in_flight",
        "batch_linger_us",  NULL,
    };
    if (rl_check_keys(json, path, known, err, errlen) < 0)
        return -1;
    struct rl_redis *rc = xcalloc(1, sizeof(*rc));
    rc->refs = 1;
    rc->timeout_ms = 50;
    rc->connect_timeout_ms = 500;
    rc->reconnect_min_ms = 100;
    rc->reconnect_max_ms = 2000;
    rc->max_pending = 1024;
    rc->memo_size = 4096;
    rc->batch_max = 64;
    const char *addr = NULL, *master = NULL, *user = NULL, *pass = NULL, *prefix = NULL;
    json_t *sent = json_object_get(json, "sentinels");
    if (rl_get_str(json, path, "address", &addr, err, errlen) < 0 ||
        rl_get_str(json, path, "master_name", &master, err, errlen) < 0 ||
        rl_get_str(json, path, "username", &user, err, errlen) < 0 ||
        rl_get_str(json, path, "password", &pass, err, errlen) < 0 ||
        rl_get_str(json, path, "key_prefix", &prefix, err, errlen) < 0 ||
        rl_get_int(json, path, "db", 0, 1000000, &rc->db, err, errlen) < 0 ||
        rl_get_int(json, path, "timeout_ms", 1, 60000, &rc->timeout_ms, err, errlen) < 0 ||
        rl_get_int(json, path, "connect_timeout_ms", 1, 60000, &rc->connect_timeout_ms, err,
                   errlen) < 0 ||
        rl_get_int(json, path, "reconnect_min_ms", 1, 600000, &rc->reconnect_min_ms, err, errlen) <
            0 ||
        rl_get_int(json, path, "reconnect_max_ms", 1, 600000, &rc->reconnect_max_ms, err, errlen) <
            0 ||
        rl_get_int(json, path, "max_pending", 1, 1000000, &rc->max_pending, err, errlen) < 0 ||
        rl_get_int(json, path, "memo_size", 0, 1 << 20, &rc->memo_size, err, errlen) < 0 ||
        rl_get_int(json, path, "batch_max", 1, 256, &rc->batch_max, err, errlen) < 0 ||
        rl_get_int(json, path, "max_calls_in_flight", 0, 1024, &rc->max_calls_in_flight, err,
                   errlen) < 0 ||
        rl_get_int(json, path, "batch_linger_us", 0, 100000, &rc->batch_linger_us, err, errlen) <
            0)
        goto fail;
    if (rc->reconnect_max_ms < rc->reconnect_min_ms) {
        rl_err(err, errlen, "%s.reconnect_max_ms: must not be below reconnect_min_ms", path);
        goto fail;
    }
    if (rc->batch_linger_us >= rc->timeout_ms * 1000) {
        /* a lingering batch would time out before it is sent */
        rl_err(err, errlen, "%s.batch_linger_us: must be below timeout_ms (%d ms)", path,
               rc->timeout_ms);
        goto fail;
    }
    if (!!addr == !!sent) {
        rl_err(err, errlen, "%s: needs either \"address\" or \"sentinels\" (with \"master_name\")",
               path);
        goto fail;
    }
    char label[160];
    if (addr) {
        if (master) {
            rl_err(err, errlen, "%s.master_name: only with \"sentinels\"", path);
            goto fail;
        }
        if (strncmp(addr, "unix:", 5) == 0 && addr[5] == '/') {
            rc->unix_path = xstrdup(addr + 5);
        } else if (rl_parse_hostport(addr, &rc->host, &rc->port) < 0) {
            rl_err(err, errlen,
                   "%s.address: must be IP:PORT, [IPv6]:PORT, localhost:PORT or unix:/path "
                   "(names are not resolved)",
                   path);
            goto fail;
        }
        snprintf(label, sizeof(label), "%s", addr);
    } else {
        if (!json_is_array(sent) || json_array_size(sent) == 0 || json_array_size(sent) > 16) {
            rl_err(err, errlen, "%s.sentinels: must be an array of 1 to 16 \"IP:PORT\" strings",
                   path);
            goto fail;
        }
        if (!master || !*master) {
            rl_err(err, errlen, "%s.master_name: required with \"sentinels\"", path);
            goto fail;
        }
        rc->sentinels = xcalloc(json_array_size(sent), sizeof(*rc->sentinels));
        for (size_t i = 0; i < json_array_size(sent); i++) {
            json_t *s = json_array_get(sent, i);
            if (!json_is_string(s) ||
                rl_parse_hostport(json_string_value(s), &rc->sentinels[i].host,
                                  &rc->sentinels[i].port) < 0) {
                rl_err(err, errlen, "%s.sentinels[%zu]: must be IP:PORT", path, i);
                goto fail;
            }
            rc->nsentinels++;
        }
        rc->master_name = xstrdup(master);
        snprintf(label, sizeof(label), "master \"%s\" (sentinels)", master);
    }
    rc->label = xstrdup(label);
    if (user && !pass) {
        rl_err(err, errlen, "%s.username: needs \"password\"", path);
        goto fail;
    }
    rc->username = user && *user ? xstrdup(user) : NULL;
    rc->password = pass && *pass ? xstrdup(pass) : NULL; /* "" (unset ${VAR:-}) means none */
    rc->prefix = xstrdup(prefix ? prefix : "portico:rl:");
    if (strlen(rc->prefix) > 64) {
        rl_err(err, errlen, "%s.key_prefix: at most 64 bytes", path);
        goto fail;
    }
    if (rc->memo_size)
        rc->memo_size = (int)rl_pow2((size_t)rc->memo_size);
    unsigned char d[20];
    rl_digest(rl_md_sha1, RL_SCRIPT, strlen(RL_SCRIPT), d);
    rl_hex(d, 20, rc->sha);
    *gcfg = rc;
    return 0;
fail:
    rl_redis_unref(rc);
    return -1;
}

/* Not ready while some worker's Redis connection is known to be down. */
static int rl_global_ready(void *gcfg, char *why, size_t whylen)
{
    struct rl_redis *rc = gcfg;
    if (rc && __atomic_load_n(&rc->degraded_workers, __ATOMIC_ACQUIRE) > 0) {
        snprintf(why, whylen, "rate_limit: redis %s unreachable", rc->label);
        return 0;
    }
    return 1;
}

static void rl_free_global(void *gcfg)
{
    struct rl_redis *rc = gcfg;
    if (!rc)
        return;
    __atomic_store_n(&rc->dead, 1, __ATOMIC_RELEASE);
    rl_redis_unref(rc);
}

/* ---- the filter's config ------------------------------------------------ */

static void rl_free_config(void *p)
{
    struct rl_config *c = p;
    if (!c)
        return;
    for (size_t i = 0; i < c->nlimits; i++) {
        rl_keyexpr_free(&c->limits[i].key);
        rl_keyexpr_free(&c->limits[i].fallback);
        free(c->limits[i].id);
        free(c->limits[i].policy);
    }
    free(c->policy);
    rl_table_free(c->table);
    if (c->redis)
        rl_redis_unref(c->redis);
    free(c);
}

static int rl_parse_config(json_t *json, const char *path, void *gcfg, void **cfgp, char *err,
                           size_t errlen)
{
    pthread_once(&rl_md_once, rl_md_init);
    if (!json_is_object(json))
        return rl_err(err, errlen, "%s: must be an object", path);
    static const char *const known[] = { "key",     "rate",           "burst",
                                         "name",    "on_missing",     "fallback_key",
                                         "limits",  "on_redis_error", "headers",
                                         "backend", "local_max_keys", NULL };
    if (rl_check_keys(json, path, known, err, errlen) < 0)
        return -1;
    struct rl_config *c = xcalloc(1, sizeof(*c));
    json_t *limits = json_object_get(json, "limits");
    char sub[512];
    if (limits) {
        static const char *const single[] = { "key", "rate", "burst", "name", NULL };
        for (size_t i = 0; single[i]; i++) {
            if (json_object_get(json, single[i])) {
                rl_err(err, errlen, "%s.%s: not with \"limits\" (give it in each limit)", path,
                       single[i]);
                goto fail;
            }
        }
        if (!json_is_array(limits) || json_array_size(limits) == 0 ||
            json_array_size(limits) > RL_MAX_LIMITS) {
            rl_err(err, errlen, "%s.limits: must be an array of 1 to %d limits", path,
                   RL_MAX_LIMITS);
            goto fail;
        }
        for (size_t i = 0; i < json_array_size(limits); i++) {
            json_t *l = json_array_get(limits, i);
            snprintf(sub, sizeof(sub), "%s.limits[%zu]", path, i);
            if (!json_is_object(l)) {
                rl_err(err, errlen, "%s: must be an object", sub);
                goto fail;
            }
            if (rl_check_keys(l, sub, limit_keys, err, errlen) < 0)
                goto fail;
            c->nlimits++;
            if (rl_parse_limit(l, json, sub, &c->limits[i], err, errlen) < 0)
                goto fail;
        }
    } else {
        c->nlimits = 1;
        if (rl_parse_limit(json, NULL, path, &c->limits[0], err, errlen) < 0)
            goto fail;
    }
    for (size_t i = 0; i < c->nlimits; i++)
        for (size_t k = 0; k < i; k++)
            if (strcmp(c->limits[i].id, c->limits[k].id) == 0) {
                rl_err(err, errlen,
                       "%s.limits[%zu]: same key, rate and burst as limits[%zu] (or the same "
                       "name)",
                       path, i, k);
                goto fail;
            }

    const char *oe = NULL, *backend = NULL;
    if (rl_get_str(json, path, "on_redis_error", &oe, err, errlen) < 0 ||
        rl_get_str(json, path, "backend", &backend, err, errlen) < 0)
        goto fail;
    if (!oe || strcmp(oe, "local") == 0) {
        c->on_error = ON_ERR_LOCAL;
    } else if (strcmp(oe, "allow") == 0) {
        c->on_error = ON_ERR_ALLOW;
    } else if (strcmp(oe, "deny") == 0) {
        c->on_error = ON_ERR_DENY;
    } else {
        rl_err(err, errlen, "%s.on_redis_error: must be \"local\", \"allow\" or \"deny\"", path);
        goto fail;
    }
    struct rl_redis *rc = gcfg;
    if (!backend) {
        c->redis = rc;
    } else if (strcmp(backend, "redis") == 0) {
        if (!rc) {
            rl_err(err, errlen, "%s.backend: \"redis\" needs a top-level \"redis\" section", path);
            goto fail;
        }
        c->redis = rc;
    } else if (strcmp(backend, "local") != 0) {
        rl_err(err, errlen, "%s.backend: must be \"local\" or \"redis\"", path);
        goto fail;
    }
    if (c->redis)
        __atomic_add_fetch(&c->redis->refs, 1, __ATOMIC_RELAXED);
    json_t *h = json_object_get(json, "headers");
    if (h && !json_is_boolean(h)) {
        rl_err(err, errlen, "%s.headers: must be true or false", path);
        goto fail;
    }
    c->headers = h && json_is_true(h);
    int max_keys = 65536;
    if (rl_get_int(json, path, "local_max_keys", 8, 1 << 24, &max_keys, err, errlen) < 0)
        goto fail;
    /* The table serves the local backend and the "local" fallback. */
    if (!c->redis || c->on_error == ON_ERR_LOCAL)
        c->table = rl_table_new((size_t)max_keys);
    size_t plen = 1;
    for (size_t i = 0; i < c->nlimits; i++)
        plen += strlen(c->limits[i].policy) + 2;
    c->policy = xcalloc(1, plen);
    for (size_t i = 0; i < c->nlimits; i++) {
        if (i)
            strcat(c->policy, ", ");
        strcat(c->policy, c->limits[i].policy);
    }
    *cfgp = c;
    return 0;
fail:
    rl_free_config(c);
    return -1;
}

/* ---- per request -------------------------------------------------------- */

struct rl_batch;

/* Per-request state, in the request's arena. */
struct rl_req {
    struct request *r;
    const struct rl_config *cfg;
    size_t n; /* limits that apply */
    const struct rl_limit *lim[RL_MAX_LIMITS];
    int fb[RL_MAX_LIMITS]; /* the fallback key was used */
    unsigned char digest[RL_MAX_LIMITS][RL_DIGEST];
    uint64_t hash[RL_MAX_LIMITS]; /* local table and memo */
    struct rl_batch *batch;       /* waiting in this batch; NULL otherwise */
    size_t slot;                  /* its place there */
    const char *outcome;          /* for the access log */
    int have;                     /* headers to add to an allowed answer */
    uint64_t h_limit, h_remaining, h_reset_s;
};

/* Read one part; NULL when missing. */
static const char *rl_part_value(struct request *r, const struct rl_part *p, size_t *len)
{
    const char *v = NULL;
    switch (p->kind) {
    case PART_IP:
        v = request_client_ip(r);
        break;
    case PART_HEADER:
        v = request_header(r, p->arg, len);
        return v && *len ? v : NULL;
    case PART_JWT:
        v = request_var(r, p->arg);
        break;
    case PART_ROUTE:
        v = request_route_name(r);
        if (!v)
            v = "";
        break;
    case PART_CONST:
        v = p->arg;
        break;
    }
    if (v && !*v && p->kind != PART_ROUTE)
        return NULL;
    if (v)
        *len = strlen(v);
    return v;
}

/* Per thread: a SHA-256 context, made once (EVP_Digest would allocate and
 * free one per key), and the last Redis key digests. A hot key (one client
 * address, one user) would otherwise be hashed again on every request:
 * SHA-256 through EVP was the largest single cost of a Redis-backed limit
 * in callgrind. The cache is direct-mapped by SipHash under the process'
 * random key and checked against a copy of the hashed bytes, so a hit is
 * exact and clients cannot aim at each other's slots. */
#define RL_DCACHE     256 /* digests remembered per thread */
#define RL_DCACHE_KEY 64  /* longest key material remembered */

struct rl_dent {
    uint32_t len; /* 0: empty (key material is never empty) */
    unsigned char key[RL_DCACHE_KEY];
    unsigned char digest[RL_DIGEST];
};

struct rl_sha {
    EVP_MD_CTX *ctx;
    struct rl_dent ent[RL_DCACHE];
};

static pthread_key_t rl_sha_key;
static pthread_once_t rl_sha_once = PTHREAD_ONCE_INIT;

static void rl_sha_free(void *p)
{
    struct rl_sha *t = p;
    EVP_MD_CTX_free(t->ctx);
    free(t);
}

static void rl_sha_init(void)
{
    if (pthread_key_create(&rl_sha_key, rl_sha_free) != 0)
        die("rate_limit: pthread_key_create failed");
}

static struct rl_sha *rl_sha_get(void)
{
    pthread_once(&rl_sha_once, rl_sha_init);
    struct rl_sha *t = pthread_getspecific(rl_sha_key);
    if (!t) {
        t = xcalloc(1, sizeof(*t));
        t->ctx = EVP_MD_CTX_new();
        if (!t->ctx || pthread_setspecific(rl_sha_key, t) != 0)
            die("rate_limit: out of memory");
    }
    return t;
}

/* SHA-256 of a key's bytes, truncated to RL_DIGEST, through the cache. */
static void rl_sha_digest(const unsigned char *buf, size_t len, unsigned char *out)
{
    struct rl_sha *t = rl_sha_get();
    struct rl_dent *e = NULL;
    if (len <= RL_DCACHE_KEY) {
        e = &t->ent[rl_siphash(rl_sip_k0, rl_sip_k1, buf, len) & (RL_DCACHE - 1)];
        if (e->len == len && memcmp(e->key, buf, len) == 0) {
            memcpy(out, e->digest, RL_DIGEST);
            return;
        }
    }
    unsigned char d[32];
    if (!EVP_DigestInit_ex2(t->ctx, rl_md_sha256, NULL) || !EVP_DigestUpdate(t->ctx, buf, len) ||
        !EVP_DigestFinal_ex(t->ctx, d, NULL))
        die("rate_limit: digest failed");
    memcpy(out, d, RL_DIGEST);
    if (e) {
        e->len = (uint32_t)len;
        memcpy(e->key, buf, len);
        memcpy(e->digest, d, RL_DIGEST);
    }
}

/* The digest of a key expression's values for this request, or -1 when a
 * part is missing: SHA-256 for Redis (the same in every instance), SipHash
 * in its first 8 bytes for the local backend (cheaper). */
static int rl_key_digest(struct request *r, const struct rl_keyexpr *k, int sha, unsigned char *out)
{
    const char *val[RL_MAX_PARTS];
    size_t len[RL_MAX_PARTS], total = strlen(k->text) + 1;
    for (size_t i = 0; i < k->nparts; i++) {
        val[i] = rl_part_value(r, &k->parts[i], &len[i]);
        if (!val[i])
            return -1;
        total += 4 + len[i];
    }
    unsigned char stackbuf[1024];
    unsigned char *buf = total <= sizeof(stackbuf) ? stackbuf : request_alloc(r, total);
    size_t off = strlen(k->text) + 1;
    memcpy(buf, k->text, off);
    for (size_t i = 0; i < k->nparts; i++) {
        uint32_t l = (uint32_t)len[i];
        memcpy(buf + off, &l, 4);
        memcpy(buf + off + 4, val[i], len[i]);
        off += 4 + len[i];
    }
    if (!sha) {
        uint64_t h = rl_siphash(rl_sip_k0, rl_sip_k1, buf, off);
        memcpy(out, &h, 8);
        return 0;
    }
    rl_sha_digest(buf, off, out);
    return 0;
}

static void rl_build_keys(struct rl_req *q)
{
    const struct rl_config *cfg = q->cfg;
    for (size_t i = 0; i < cfg->nlimits; i++) {
        const struct rl_limit *l = &cfg->limits[i];
        size_t k = q->n;
        int fb = 0;
        int sha = cfg->redis != NULL;
        if (rl_key_digest(q->r, &l->key, sha, q->digest[k]) < 0) {
            if (!l->has_fallback || rl_key_digest(q->r, &l->fallback, sha, q->digest[k]) < 0)
                continue; /* skipped: this limit does not apply */
            fb = 1;
        }
        uint64_t d64;
        memcpy(&d64, q->digest[k], 8);
        q->lim[k] = l;
        q->fb[k] = fb;
        q->hash[k] = rl_mix(d64 ^ l->salt ^ (fb ? 0x5bd1e995u : 0)) | 1;
        q->n++;
    }
}

static void rl_set_headers(struct request *r, const struct rl_config *cfg, uint64_t limit,
                           uint64_t remaining, uint64_t reset_s)
{
    char v[32];
    snprintf(v, sizeof(v), "%llu", (unsigned long long)limit);
    response_set_header(r, "RateLimit-Limit", v);
    snprintf(v, sizeof(v), "%llu", (unsigned long long)remaining);
    response_set_header(r, "RateLimit-Remaining", v);
    snprintf(v, sizeof(v), "%llu", (unsigned long long)reset_s);
    response_set_header(r, "RateLimit-Reset", v);
    response_set_header(r, "RateLimit-Policy", cfg->policy);
}

/* Apply a decision: answer 429 (returns FILTER_RESPONDED) or remember the
 * headers for the allowed answer (returns FILTER_CONTINUE). Works from the
 * hook and from a later callback alike. */
static enum filter_status rl_apply(struct rl_req *q, const struct rl_outcome *o)
{
    size_t bind = 0;
    for (size_t i = 1; i < q->n; i++) {
        if (o->allowed ? o->remaining[i] < o->remaining[bind] : o->retry_ms[i] > o->retry_ms[bind])
            bind = i;
    }
    uint64_t limit = q->lim[bind]->gcra.burst;
    uint64_t reset_s = (o->reset_ms[bind] + 999) / 1000;
    if (o->allowed) {
        q->have = 1;
        q->h_limit = limit;
        q->h_remaining = o->remaining[bind];
        q->h_reset_s = reset_s;
        return FILTER_CONTINUE;
    }
    uint64_t retry_s = (o->retry_ms[bind] + 999) / 1000;
    char v[32];
    snprintf(v, sizeof(v), "%llu", (unsigned long long)(retry_s ? retry_s : 1));
    response_set_header(q->r, "Retry-After", v);
    rl_set_headers(q->r, q->cfg, limit, 0, reset_s);
    request_respond(q->r, 429, NULL, RL_BODY_429, sizeof(RL_BODY_429) - 1);
    return FILTER_RESPONDED;
}

static enum filter_status rl_local(struct rl_req *q)
{
    const struct gcra_policy *pol[RL_MAX_LIMITS];
    for (size_t i = 0; i < q->n; i++)
        pol[i] = &q->lim[i]->gcra;
    struct rl_outcome o;
    rl_local_decide(q->cfg->table, q->hash, pol, q->n, rl_now_ns(), &o);
    if (!q->outcome)
        q->outcome = o.allowed ? "allowed" : "limited";
    return rl_apply(q, &o);
}

/* Redis could not decide: on_redis_error says what happens. */
static enum filter_status rl_fallback(struct rl_req *q)
{
    __atomic_add_fetch(&q->cfg->redis->fallbacks, 1, __ATOMIC_RELAXED);
    module_metric_add("portico_rate_limit_redis_fallbacks_total", 1, NULL, NULL, NULL, NULL);
    switch (q->cfg->on_error) {
    case ON_ERR_LOCAL:
        q->outcome = "fallback_local";
        return rl_local(q);
    case ON_ERR_ALLOW:
        q->outcome = "fallback_allowed";
        return FILTER_CONTINUE;
    case ON_ERR_DENY:
        break;
    }
    q->outcome = "fallback_denied";
    response_set_header(q->r, "Retry-After", "1");
    request_respond(q->r, 503, NULL, RL_BODY_503, sizeof(RL_BODY_503) - 1);
    return FILTER_RESPONDED;
}

/* ---- the Redis connection of a worker ----------------------------------- */

enum rw_state { RW_DOWN, RW_ASKING, RW_CONNECTING, RW_READY };

struct rl_memo {
    uint64_t hash, until, reset_until; /* ns, CLOCK_MONOTONIC */
};

/* One worker thread's connection to one config's Redis; lives on that
 * worker's loop only, in the thread's list (rl_tls_key). */
struct rl_worker {
    struct rl_worker *next;
    struct rl_redis *rc; /* a reference */
    struct event_base *base;
    redisAsyncContext *ac;  /* the master connection, or NULL */
    redisAsyncContext *sac; /* a sentinel query in flight, or NULL */
    enum rw_state state;
    int degraded, closing, probing;
    uint64_t probe_since; /* ns: the unanswered probe went out then */
    int backoff_ms;
    size_t next_sentinel;
    int pending;         /* requests waiting on Redis, in batches filling or sent */
    int in_flight;       /* calls sent and neither answered nor timed out */
    struct event *timer; /* retry, connect timeout or probe, by state */
    struct event *tick;  /* notices a dropped config */
    struct event *flush; /* sends the batches filled in this loop turn */
    int flush_active;    /* flush is made active and has not run yet */
    struct rl_memo *memo;
    /* Batches filling in this loop turn (only the last has room). */
    struct rl_batch *fill_head, *fill_tail;
    /* Batches made while the sentinels are asked for the master: owned
     * here until sent. */
    struct rl_batch *wait_head, **wait_tail;
};

/* The requests of one worker decided by one script call. Filled during
 * a loop turn (w->fill_head) and sent at its end, or kept in w's waiting
 * list while the master is not known; once sent, owned by hiredis'
 * callback, which always runs (with no reply when the connection goes)
 * and frees it. A request that stops waiting (it ended, or the batch
 * timed out) only clears its slot. */
struct rl_batch {
    struct rl_worker *w;
    struct rl_batch *next;     /* in w's filling or waiting list */
    struct event *timer;       /* timeout_ms from its first request; NULL once nobody waits */
    int evalled;               /* already resent as EVAL after NOSCRIPT */
    int flying;                /* counted in w->in_flight */
    uint64_t linger_until;     /* ns: held until then (born while a call was in flight) */
    size_t n, cap;             /* slots used, slots */
    size_t attached;           /* slots whose request still waits */
    size_t nkeys;              /* keys of all slots (set when sent) */
    struct rl_req **q;         /* per slot; NULL once the request stopped waiting */
    unsigned char *nk;         /* keys per slot (set when sent) */
    char *cmd;                 /* the call in RESP, kept for a resend after NOSCRIPT */
    size_t cmdlen, body, argc; /* body: where the arguments after the script's start */
};

static pthread_key_t rl_tls_key;
static pthread_once_t rl_tls_once = PTHREAD_ONCE_INIT;

static void rl_worker_start(struct rl_worker *w);
static void rl_flush_waiting(struct rl_worker *w, int send);
static void rl_batch_drop(struct rl_batch *b);
static void on_flush(evutil_socket_t fd, short what, void *arg);
static void on_eval_reply(redisAsyncContext *ac, void *rv, void *priv);

static void rl_trouble(struct rl_worker *w, const char *what, const char *detail)
{
    if (w->degraded || w->closing)
        return;
    w->degraded = 1;
    if (__atomic_fetch_add(&w->rc->degraded_workers, 1, __ATOMIC_ACQ_REL) == 0)
        log_warn("rate_limit: redis %s: %s%s%s; on_redis_error applies until it answers",
                 w->rc->label, what, detail ? ": " : "", detail ? detail : "");
}

static void rl_recover(struct rl_worker *w)
{
    if (!w->degraded)
        return;
    w->degraded = 0;
    if (__atomic_sub_fetch(&w->rc->degraded_workers, 1, __ATOMIC_ACQ_REL) == 0)
        log_info("rate_limit: redis %s answers again (%llu requests used on_redis_error so far)",
                 w->rc->label,
                 (unsigned long long)__atomic_load_n(&w->rc->fallbacks, __ATOMIC_RELAXED));
}

static void rl_arm(struct rl_worker *w, int ms)
{
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    evtimer_add(w->timer, &tv);
}

/* Drop the connections (pending calls get their callback with no reply:
 * they fall back) and try again after the backoff. */
static void rl_down(struct rl_worker *w, const char *what, const char *detail)
{
    rl_trouble(w, what, detail);
    if (w->ac) {
        redisAsyncContext *ac = w->ac;
        w->ac = NULL;
        redisAsyncFree(ac); /* deferred by hiredis when inside ac's callback */
    }
    if (w->sac) {
        redisAsyncContext *sac = w->sac;
        w->sac = NULL;
        redisAsyncFree(sac);
    }
    w->probing = 0;
    rl_flush_waiting(w, 0);
    if (w->closing)
        return;
    w->state = RW_DOWN;
    rl_arm(w, w->backoff_ms);
    w->backoff_ms =
        w->backoff_ms * 2 > w->rc->reconnect_max_ms ? w->rc->reconnect_max_ms : w->backoff_ms * 2;
}

static void on_master_connect(const redisAsyncContext *ac, int status)
{
    struct rl_worker *w = ac->data;
    if (status == REDIS_OK || ac != w->ac)
        return;
    w->ac = NULL; /* hiredis frees it after this callback */
    rl_down(w, "cannot connect", ac->errstr);
}

static void on_master_disconnect(const redisAsyncContext *ac, int status)
{
    struct rl_worker *w = ac->data;
    if (ac != w->ac)
        return; /* one we dropped ourselves */
    w->ac = NULL;
    rl_down(w, "connection lost", status == REDIS_OK ? NULL : ac->errstr);
}

enum rl_step { STEP_AUTH = 1, STEP_SELECT, STEP_ROLE, STEP_LOAD };

static void on_setup_reply(redisAsyncContext *ac, void *rv, void *priv)
{
    struct rl_worker *w = ac->data;
    redisReply *rep = rv;
    enum rl_step step = (enum rl_step)(intptr_t)priv;
    if (ac != w->ac || w->closing || !rep)
        return; /* a connection already dropped */
    if (rep->type == REDIS_REPLY_ERROR) {
        /* Redis' own message (it never echoes a password) */
        rl_down(w,
                step == STEP_AUTH     ? "AUTH refused"
                : step == STEP_SELECT ? "SELECT refused"
                                      : "setup refused",
                rep->str);
        return;
    }
    if (step == STEP_ROLE) {
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 1 ||
            rep->element[0]->type != REDIS_REPLY_STRING || strcmp(rep->element[0]->str, "master"))
            rl_down(w, "the address given by the sentinels is not a master", NULL);
        return;
    }
    if (step == STEP_LOAD) {
        if (rep->type != REDIS_REPLY_STRING || strcmp(rep->str, w->rc->sha) != 0) {
            rl_down(w, "SCRIPT LOAD answered unexpectedly", NULL);
            return;
        }
        w->state = RW_READY;
        evtimer_del(w->timer);
        w->backoff_ms = w->rc->reconnect_min_ms;
        rl_recover(w);
    }
}

static void rl_connect_master(struct rl_worker *w, const char *host, int port)
{
    const struct rl_redis *rc = w->rc;
    redisAsyncContext *ac = rc->unix_path && !host ? redisAsyncConnectUnix(rc->unix_path)
                                                   : redisAsyncConnect(host, port);
    if (!ac)
        die("rate_limit: out of memory");
    if (ac->err) {
        char msg[128];
        snprintf(msg, sizeof(msg), "%s", ac->errstr);
        redisAsyncFree(ac);
        rl_down(w, "cannot connect", msg);
        return;
    }
    ac->data = w;
    w->ac = ac;
    if (rl_events_attach(ac, w->base) < 0)
        die("rate_limit: out of memory");
    redisAsyncSetConnectCallback(ac, on_master_connect);
    redisAsyncSetDisconnectCallback(ac, on_master_disconnect);
    /* Queued now, sent once connected, answered in this order; requests
     * queued behind them find the script loaded. */
    if (rc->password) {
        if (rc->username)
            redisAsyncCommand(ac, on_setup_reply, (void *)(intptr_t)STEP_AUTH, "AUTH %s %s",
                              rc->username, rc->password);
        else
            redisAsyncCommand(ac, on_setup_reply, (void *)(intptr_t)STEP_AUTH, "AUTH %s",
                              rc->password);
    }
    if (rc->db)
        redisAsyncCommand(ac, on_setup_reply, (void *)(intptr_t)STEP_SELECT, "SELECT %d", rc->db);
    if (rc->nsentinels)
        redisAsyncCommand(ac, on_setup_reply, (void *)(intptr_t)STEP_ROLE, "ROLE");
    redisAsyncCommand(ac, on_setup_reply, (void *)(intptr_t)STEP_LOAD, "SCRIPT LOAD %s", RL_SCRIPT);
    w->state = RW_CONNECTING;
    rl_arm(w, rc->connect_timeout_ms);
    rl_flush_waiting(w, 1);
}

static void on_sentinel_connect(const redisAsyncContext *ac, int status)
{
    struct rl_worker *w = ac->data;
    if (status == REDIS_OK || ac != w->sac)
        return;
    w->sac = NULL;
    rl_down(w, "cannot reach a sentinel", ac->errstr);
}

static void on_sentinel_disconnect(const redisAsyncContext *ac, int status)
{
    struct rl_worker *w = ac->data;
    if (ac != w->sac)
        return;
    w->sac = NULL;
    rl_down(w, "sentinel connection lost", NULL);
}

static void on_sentinel_reply(redisAsyncContext *ac, void *rv, void *priv)
{
    struct rl_worker *w = ac->data;
    redisReply *rep = rv;
    if (ac != w->sac || w->closing)
        return;
    w->sac = NULL;
    redisAsyncFree(ac); /* deferred until this callback returns */
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
        rep->element[0]->type != REDIS_REPLY_STRING ||
        rep->element[1]->type != REDIS_REPLY_STRING) {
        rl_down(w, "the sentinel does not know the master", NULL);
        return;
    }
    char host[64];
    snprintf(host, sizeof(host), "%s", rep->element[0]->str);
    int port = atoi(rep->element[1]->str);
    rl_connect_master(w, host, port);
}

static void rl_ask_sentinel(struct rl_worker *w)
{
    const struct rl_redis *rc = w->rc;
    const struct rl_hostport *s = &rc->sentinels[w->next_sentinel++ % rc->nsentinels];
    redisAsyncContext *sac = redisAsyncConnect(s->host, s->port);
    if (!sac)
        die("rate_limit: out of memory");
    if (sac->err) {
        char msg[128];
        snprintf(msg, sizeof(msg), "%s", sac->errstr);
        redisAsyncFree(sac);
        rl_down(w, "cannot reach a sentinel", msg);
        return;
    }
    sac->data = w;
    w->sac = sac;
    if (rl_events_attach(sac, w->base) < 0)
        die("rate_limit: out of memory");
    redisAsyncSetConnectCallback(sac, on_sentinel_connect);
    redisAsyncSetDisconnectCallback(sac, on_sentinel_disconnect);
    redisAsyncCommand(sac, on_sentinel_reply, NULL, "SENTINEL get-master-addr-by-name %s",
                      rc->master_name);
    w->state = RW_ASKING;
    rl_arm(w, rc->connect_timeout_ms);
}

static void rl_worker_start(struct rl_worker *w)
{
    if (w->rc->nsentinels)
        rl_ask_sentinel(w);
    else
        rl_connect_master(w, w->rc->unix_path ? NULL : w->rc->host, w->rc->port);
}

static void on_probe_reply(redisAsyncContext *ac, void *rv, void *priv)
{
    struct rl_worker *w = ac->data;
    if (ac != w->ac || w->closing)
        return;
    w->probing = 0;
    if (rv) /* any answer, NOSCRIPT included: Redis runs commands again */
        rl_recover(w);
}

static void on_worker_timer(evutil_socket_t fd, short what, void *arg)
{
    struct rl_worker *w = arg;
    switch (w->state) {
    case RW_DOWN:
        rl_worker_start(w);
        break;
    case RW_ASKING:
    case RW_CONNECTING:
        rl_down(w, "connect timed out", NULL);
        break;
    case RW_READY:
        if (!w->degraded)
            break;
        if (!w->probing) {
            w->probing = 1;
            w->probe_since = rl_now_ns();
            redisAsyncCommand(w->ac, on_probe_reply, NULL, "EVALSHA %s 0", w->rc->sha);
        } else if (rl_now_ns() - w->probe_since > (uint64_t)w->rc->connect_timeout_ms * 1000000u) {
            /* A connection that stays silent (a stopped server, a network
             * partition without resets) is replaced: the new one finds the
             * server again, or, with Sentinel, the new master. */
            rl_down(w, "no answer; reconnecting", NULL);
            break;
        }
        rl_arm(w, RL_PROBE_MS);
        break;
    }
}

/* Close everything of w, on its own thread (tick or thread exit). */
static void rl_worker_free(struct rl_worker *w)
{
    w->closing = 1;
    if (w->ac) {
        redisAsyncContext *ac = w->ac;
        w->ac = NULL;
        redisAsyncFree(ac);
    }
    if (w->sac) {
        redisAsyncContext *sac = w->sac;
        w->sac = NULL;
        redisAsyncFree(sac);
    }
    rl_flush_waiting(w, 0);
    while (w->fill_head) {
        struct rl_batch *b = w->fill_head;
        w->fill_head = b->next;
        rl_batch_drop(b);
    }
    if (w->degraded)
        __atomic_sub_fetch(&w->rc->degraded_workers, 1, __ATOMIC_ACQ_REL);
    event_free(w->timer);
    event_free(w->tick);
    event_free(w->flush);
    free(w->memo);
    rl_redis_unref(w->rc);
    free(w);
}

/* Thread exit: the worker's loop has ended, its base still exists. */
static void rl_tls_destroy(void *head)
{
    struct rl_worker *w = head;
    while (w) {
        struct rl_worker *next = w->next;
        rl_worker_free(w);
        w = next;
    }
}

static void rl_tls_init(void)
{
    if (pthread_key_create(&rl_tls_key, rl_tls_destroy) != 0)
        die("rate_limit: pthread_key_create failed");
}

static void on_worker_tick(evutil_socket_t fd, short what, void *arg)
{
    struct rl_worker *w = arg;
    if (!__atomic_load_n(&w->rc->dead, __ATOMIC_ACQUIRE))
        return;
    struct rl_worker *head = pthread_getspecific(rl_tls_key), **pp = &head;
    while (*pp && *pp != w)
        pp = &(*pp)->next;
    if (*pp)
        *pp = w->next;
    pthread_setspecific(rl_tls_key, head);
    rl_worker_free(w);
}

static struct rl_worker *rl_worker_get(struct request *r, struct rl_redis *rc)
{
    pthread_once(&rl_tls_once, rl_tls_init);
    struct rl_worker *head = pthread_getspecific(rl_tls_key);
    for (struct rl_worker *w = head; w; w = w->next)
        if (w->rc == rc)
            return w;
    struct rl_worker *w = xcalloc(1, sizeof(*w));
    __atomic_add_fetch(&rc->refs, 1, __ATOMIC_RELAXED);
    w->rc = rc;
    w->base = request_event_base(r);
    w->backoff_ms = rc->reconnect_min_ms;
    w->wait_tail = &w->wait_head;
    w->timer = evtimer_new(w->base, on_worker_timer, w);
    w->tick = event_new(w->base, -1, EV_PERSIST, on_worker_tick, w);
    w->flush = event_new(w->base, -1, 0, on_flush, w);
    if (!w->timer || !w->tick || !w->flush)
        die("rate_limit: cannot create timers");
    struct timeval tv = { RL_TICK_MS / 1000, (RL_TICK_MS % 1000) * 1000 };
    event_add(w->tick, &tv);
    if (rc->memo_size)
        w->memo = xcalloc((size_t)rc->memo_size, sizeof(*w->memo));
    w->next = head;
    pthread_setspecific(rl_tls_key, w);
    rl_worker_start(w);
    return w;
}

/* ---- a request's Redis call --------------------------------------------- */

static void rl_batch_free(struct rl_batch *b)
{
    if (b->timer)
        event_free(b->timer);
    b->w->pending -= (int)b->n;
    free(b->cmd);
    free(b);
}

/* The request stops waiting for its batch (it ended, it timed out, or the
 * answer came): its slot is cleared; the batch stays with its owner. */
static void rl_detach(struct rl_req *q)
{
    struct rl_batch *b = q->batch;
    if (!b)
        return;
    q->batch = NULL;
    b->q[q->slot] = NULL;
    if (--b->attached == 0 && b->timer) {
        event_free(b->timer);
        b->timer = NULL;
    }
}

static void rl_req_cleanup(void *arg)
{
    rl_detach(arg);
}

/* Redis will not decide for q: on_redis_error does. */
static void rl_give_up(struct rl_req *q)
{
    rl_detach(q);
    if (rl_fallback(q) == FILTER_CONTINUE)
        request_resume(q->r);
}

/* A batch that will not be sent (or not again): its requests fall back. */
static void rl_batch_drop(struct rl_batch *b)
{
    for (size_t i = 0; i < b->n; i++)
        if (b->q[i])
            rl_give_up(b->q[i]);
    rl_batch_free(b);
}

static void rl_batch_send(struct rl_worker *w, struct rl_batch *b)
{
    if (redisAsyncFormattedCommand(w->ac, on_eval_reply, b, b->cmd, b->cmdlen) != REDIS_OK) {
        rl_trouble(w, "cannot send", NULL);
        rl_batch_drop(b);
        return;
    }
    b->flying = 1;
    w->in_flight++;
}

/* The batches filling go out (or are held again) at the end of this loop
 * turn, after its other events. */
static void rl_flush_soon(struct rl_worker *w)
{
    if (w->flush_active)
        return;
    w->flush_active = 1;
    event_active(w->flush, EV_TIMEOUT, 1);
}

/* b's call is answered or timed out: batches held behind it go out at the
 * end of this loop turn. */
static void rl_batch_landed(struct rl_batch *b)
{
    struct rl_worker *w = b->w;
    if (!b->flying)
        return;
    b->flying = 0;
    w->in_flight--;
    if (w->fill_head && !w->closing)
        rl_flush_soon(w);
}

/* send: the master connection exists, send the waiting batches behind its
 * setup; else they all fall back. */
static void rl_flush_waiting(struct rl_worker *w, int send)
{
    struct rl_batch *b = w->wait_head;
    w->wait_head = NULL;
    w->wait_tail = &w->wait_head;
    while (b) {
        struct rl_batch *next = b->next;
        b->next = NULL;
        if (!b->attached)
            rl_batch_free(b);
        else if (!send)
            rl_batch_drop(b);
        else
            rl_batch_send(w, b);
        b = next;
    }
}

/* The call for b (layout in rate_limit_batch.h), formatted in RESP. */
/* What names a Redis key: a limit, the key's digest and whether it is the
 * fallback key. The batch finds repeated keys by these bytes and formats
 * each distinct key's name once. */
struct rl_keyid {
    unsigned char digest[RL_DIGEST];
    const struct rl_limit *lim;
    uintptr_t fb;
};

static void rl_batch_build(const struct rl_redis *rc, struct rl_batch *b)
{
    size_t plen = strlen(rc->prefix);
    size_t keymax = plen + 1 + 2 * RL_DIGEST + 2 + 64 + 3 + 1;
    size_t setmem = rl_strset_mem(b->nkeys);
    size_t limmem = b->nkeys * sizeof(struct rl_limit *);
    size_t idmem = b->nkeys * (sizeof(struct rl_keyid) + sizeof(size_t));
    char *tmp =
        xmalloc(limmem + idmem + 2 * setmem + b->nkeys * keymax + b->n + 4 * b->nkeys);
    const struct rl_limit **lim = (const struct rl_limit **)(void *)tmp;
    struct rl_keyid *ids = (struct rl_keyid *)(void *)(tmp + limmem);
    size_t *klen = (size_t *)(void *)(ids + b->nkeys);
    char *sets = tmp + limmem + idmem;
    char *kbuf = sets + 2 * setmem;
    unsigned char *plan = (unsigned char *)kbuf + b->nkeys * keymax;
    struct rl_strset keys, pols;
    rl_strset_init(&keys, b->nkeys, sets);
    rl_strset_init(&pols, b->nkeys, sets + setmem);
    size_t planlen = 0;
    for (size_t i = 0; i < b->n; i++) {
        const struct rl_req *q = b->q[i];
        size_t ki[RL_MAX_LIMITS], pi[RL_MAX_LIMITS];
        for (size_t j = 0; j < q->n; j++) {
            struct rl_keyid *id = &ids[keys.n];
            memcpy(id->digest, q->digest[j], RL_DIGEST);
            id->lim = q->lim[j];
            id->fb = (uintptr_t)q->fb[j];
            size_t known = keys.n;
            ki[j] = rl_strset_add(&keys, (const char *)id, sizeof(*id));
            pi[j] =
                rl_strset_add(&pols, (const char *)&q->lim[j]->gcra, sizeof(struct gcra_policy));
            if (keys.n == known)
                continue;
            /* a new key: its name <prefix>{<hex digest>}:<id>[:fb] */
            char *key = kbuf + ki[j] * keymax, *e = key;
            const char *lid = q->lim[j]->id;
            size_t idlen = strlen(lid);
            memcpy(e, rc->prefix, plen);
            e += plen;
            *e++ = '{';
            rl_hex(q->digest[j], RL_DIGEST, e);
            e += 2 * RL_DIGEST;
            *e++ = '}';
            *e++ = ':';
            memcpy(e, lid, idlen);
            e += idlen;
            if (q->fb[j]) {
                memcpy(e, ":fb", 3);
                e += 3;
            }
            klen[ki[j]] = (size_t)(e - key);
        }
        planlen += rl_plan_put(plan + planlen, q->n, ki, pi);
    }
    char nk[24], np[24];
    size_t nkl = (size_t)snprintf(nk, sizeof(nk), "%zu", keys.n);
    size_t npl = (size_t)snprintf(np, sizeof(np), "%zu", pols.n);
    size_t body = rl_resp_arg_len(nkl) + rl_resp_arg_len(npl) + rl_resp_arg_len(planlen);
    for (size_t k = 0; k < keys.n; k++)
        body += rl_resp_arg_len(klen[k]);
    for (size_t p = 0; p < pols.n; p++) {
        lim[p] =
            (const struct rl_limit *)(const void *)(pols.str[p] - offsetof(struct rl_limit, gcra));
        body +=
            rl_resp_arg_len(strlen(lim[p]->interval_us)) + rl_resp_arg_len(strlen(lim[p]->burst_s));
    }
    b->argc = 3 + keys.n + 1 + 2 * pols.n + 1;
    size_t head = 24 + rl_resp_arg_len(7) + rl_resp_arg_len(40);
    char *cmd = xmalloc(head + body), *e = cmd;
    e = rl_resp_num(e, '*', b->argc);
    e = rl_resp_arg(e, "EVALSHA", 7);
    e = rl_resp_arg(e, rc->sha, 40);
    b->body = (size_t)(e - cmd);
    e = rl_resp_arg(e, nk, nkl);
    for (size_t k = 0; k < keys.n; k++)
        e = rl_resp_arg(e, kbuf + k * keymax, klen[k]);
    e = rl_resp_arg(e, np, npl);
    for (size_t p = 0; p < pols.n; p++) {
        e = rl_resp_arg(e, lim[p]->interval_us, strlen(lim[p]->interval_us));
        e = rl_resp_arg(e, lim[p]->burst_s, strlen(lim[p]->burst_s));
    }
    e = rl_resp_arg(e, plan, planlen);
    b->cmd = cmd;
    b->cmdlen = (size_t)(e - cmd);
    free(tmp);
}

/* After NOSCRIPT: the same call as EVAL of the script. */
static void rl_batch_as_eval(struct rl_batch *b)
{
    size_t body = b->cmdlen - b->body;
    char *cmd = xmalloc(24 + rl_resp_arg_len(4) + rl_resp_arg_len(sizeof(RL_SCRIPT) - 1) + body);
    char *e = rl_resp_num(cmd, '*', b->argc);
    e = rl_resp_arg(e, "EVAL", 4);
    e = rl_resp_arg(e, RL_SCRIPT, sizeof(RL_SCRIPT) - 1);
    memcpy(e, b->cmd + b->body, body);
    free(b->cmd);
    b->body = (size_t)(e - cmd);
    b->cmd = cmd;
    b->cmdlen = b->body + body;
}

static void on_batch_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct rl_batch *b = arg;
    struct rl_worker *w = b->w;
    event_free(b->timer);
    b->timer = NULL; /* the late answer, if any, only frees b */
    rl_trouble(w, "no answer within timeout_ms", NULL);
    rl_batch_landed(b); /* the batches held behind it fall back now */
    if (w->state == RW_READY && !evtimer_pending(w->timer, NULL))
        rl_arm(w, RL_PROBE_MS);
    for (size_t i = 0; i < b->n; i++)
        if (b->q[i])
            rl_give_up(b->q[i]);
}

/* timeout_ms from the batch's first request: a request held behind a call
 * in flight waits no longer than one sent at once. */
static void rl_batch_arm(struct rl_worker *w, struct rl_batch *b)
{
    b->timer = evtimer_new(w->base, on_batch_timeout, b);
    if (!b->timer)
        die("rate_limit: evtimer_new failed");
    struct timeval tv = { w->rc->timeout_ms / 1000, (w->rc->timeout_ms % 1000) * 1000 };
    evtimer_add(b->timer, &tv);
}

/* Batches can go to Redis now, or (before the sentinels have named the
 * master) wait for it; once in trouble, nothing waits. */
static int rl_usable(const struct rl_worker *w)
{
    return !w->degraded && !w->closing &&
           (w->state == RW_ASKING || (w->ac && w->state != RW_DOWN));
}

/* b, the first batch not sent, stays for now: under load the batches grow
 * instead of the calls multiplying. A full batch cannot grow, so it goes
 * at once (past batch_max per round trip the cap yields); a lingering one
 * brings the flush back when its linger ends. */
static int rl_batch_held(struct rl_worker *w, const struct rl_batch *b)
{
    if (b->n == b->cap || !rl_usable(w) || w->state == RW_ASKING)
        return 0;
    int cap = w->rc->max_calls_in_flight;
    if (cap && w->in_flight >= cap)
        return 1; /* a landing brings the flush back */
    if (!b->linger_until)
        return 0;
    uint64_t now = rl_now_ns();
    if (now >= b->linger_until)
        return 0;
    uint64_t left = (b->linger_until - now) / 1000;
    struct timeval tv = { (time_t)(left / 1000000), (suseconds_t)(left % 1000000) };
    event_add(w->flush, &tv);
    return 1;
}

/* Send the batches filled during this loop turn (an event made active by
 * the turn's first paused request runs after the turn's other events). */
static void on_flush(evutil_socket_t fd, short what, void *arg)
{
    struct rl_worker *w = arg;
    struct rl_batch *b = w->fill_head;
    w->flush_active = 0;
    w->fill_head = NULL;
    while (b) {
        struct rl_batch *next = b->next;
        if (rl_batch_held(w, b)) {
            w->fill_head = b;
            return;
        }
        b->next = NULL;
        /* compact: requests that left while the batch filled */
        size_t n = 0;
        b->nkeys = 0;
        for (size_t i = 0; i < b->n; i++) {
            struct rl_req *q = b->q[i];
            if (!q)
                continue;
            q->slot = n;
            b->q[n] = q;
            b->nk[n++] = (unsigned char)q->n;
            b->nkeys += q->n;
        }
        w->pending -= (int)(b->n - n);
        b->n = n;
        if (n == 0) {
            rl_batch_free(b);
        } else if (!rl_usable(w)) {
            rl_batch_drop(b);
        } else {
            rl_batch_build(w->rc, b);
            if (!b->timer)
                rl_batch_arm(w, b);
            if (w->state == RW_ASKING) {
                *w->wait_tail = b;
                w->wait_tail = &b->next;
            } else {
                rl_batch_send(w, b);
            }
        }
        b = next;
    }
}

/* A refusal from Redis holds until retry: remember it on this worker. */
static void rl_memo_put(struct rl_worker *w, uint64_t h, uint64_t now, uint64_t retry_ms,
                        uint64_t reset_ms)
{
    if (!w->memo || !retry_ms)
        return;
    struct rl_memo *m = &w->memo[h & (uint64_t)(w->rc->memo_size - 1)];
    m->hash = h;
    m->until = now + retry_ms * 1000000u;
    m->reset_until = now + reset_ms * 1000000u;
}

/* One request's part of a good answer: v[0..q->n-1]. */
static void rl_decided(struct rl_worker *w, struct rl_req *q, redisReply **v, uint64_t now)
{
    long long x[RL_MAX_LIMITS];
    const struct gcra_policy *pol[RL_MAX_LIMITS];
    for (size_t i = 0; i < q->n; i++) {
        x[i] = v[i]->integer;
        pol[i] = &q->lim[i]->gcra;
    }
    struct rl_outcome o;
    if (rl_batch_decode(x, q->n, pol, &o) < 0) {
        rl_give_up(q);
        return;
    }
    for (size_t i = 0; i < q->n && !o.allowed; i++)
        rl_memo_put(w, q->hash[i], now, o.retry_ms[i], o.reset_ms[i]);
    q->outcome = o.allowed ? "allowed" : "limited";
    if (rl_apply(q, &o) == FILTER_CONTINUE)
        request_resume(q->r);
}

static void on_eval_reply(redisAsyncContext *ac, void *rv, void *priv)
{
    struct rl_batch *b = priv;
    struct rl_worker *w = b->w;
    redisReply *rep = rv;
    if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0 &&
        !b->evalled && b->attached && ac == w->ac && !w->closing) {
        /* Redis restarted or SCRIPT FLUSH: EVAL runs the whole batch and
         * caches the script again for the next EVALSHA. */
        b->evalled = 1;
        rl_batch_as_eval(b);
        if (redisAsyncFormattedCommand(ac, on_eval_reply, b, b->cmd, b->cmdlen) == REDIS_OK)
            return;
    }
    if (b->timer) {
        event_free(b->timer);
        b->timer = NULL;
    }
    rl_batch_landed(b);
    int good = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == b->nkeys;
    for (size_t i = 0; good && i < b->nkeys; i++)
        good = rep->element[i]->type == REDIS_REPLY_INTEGER;
    if (good && !w->closing) {
        rl_recover(w);
    } else if (!good && !w->closing && b->attached) {
        const char *msg = rep && rep->type == REDIS_REPLY_ERROR ? rep->str : NULL;
        if (msg &&
            (strncmp(msg, "READONLY", 8) == 0 || strncmp(msg, "LOADING", 7) == 0 ||
             strncmp(msg, "MASTERDOWN", 10) == 0) &&
            ac == w->ac)
            rl_down(w, "not a usable master", msg);
        else
            rl_trouble(w, rep ? "the script failed" : "connection lost", msg);
    }
    uint64_t now = rl_now_ns();
    size_t off = 0;
    for (size_t i = 0; i < b->n; i++) {
        struct rl_req *q = b->q[i];
        if (q && !good) {
            rl_give_up(q);
        } else if (q) {
            rl_detach(q);
            rl_decided(w, q, rep->element + off, now);
        }
        off += b->nk[i];
    }
    rl_batch_free(b);
}

/* Refuse from the memo when a key is known to be over: Redis is not asked. */
static int rl_memo_refuse(struct rl_worker *w, struct rl_req *q)
{
    if (!w->memo)
        return 0;
    uint64_t now = 0; /* read once a key matches: most requests match none */
    struct rl_outcome o = { .allowed = 0 };
    int hit = 0;
    for (size_t i = 0; i < q->n; i++) {
        const struct rl_memo *m = &w->memo[q->hash[i] & (uint64_t)(w->rc->memo_size - 1)];
        if (m->hash != q->hash[i])
            continue;
        if (!now)
            now = rl_now_ns();
        if (m->until > now) {
            hit = 1;
            o.retry_ms[i] = rl_ceil_ms(m->until - now);
            o.reset_ms[i] = m->reset_until > now ? rl_ceil_ms(m->reset_until - now) : 0;
        }
    }
    if (!hit)
        return 0;
    q->outcome = "limited_memo";
    rl_apply(q, &o);
    return 1;
}

/* The request joins the batch of this loop turn; nothing is sent from
 * here, so the request is paused before anything can resume it. */
static enum filter_status rl_redis(struct rl_req *q)
{
    struct rl_redis *rc = q->cfg->redis;
    struct rl_worker *w = rl_worker_get(q->r, rc);
    if (rl_memo_refuse(w, q))
        return FILTER_RESPONDED;
    if (!rl_usable(w))
        return rl_fallback(q);
    if (w->pending >= rc->max_pending) {
        rl_trouble(w, "too many calls in flight (max_pending)", NULL);
        return rl_fallback(q);
    }
    struct rl_batch *b = w->fill_tail && w->fill_head ? w->fill_tail : NULL;
    if (!b || b->n == b->cap) {
        size_t cap = (size_t)rc->batch_max;
        b = xcalloc(1, sizeof(*b) + cap * (sizeof(struct rl_req *) + 1));
        b->w = w;
        b->cap = cap;
        b->q = (struct rl_req **)(b + 1);
        b->nk = (unsigned char *)(b->q + cap);
        if (w->fill_head)
            w->fill_tail->next = b;
        else
            w->fill_head = b;
        w->fill_tail = b;
        if (rc->batch_linger_us && w->in_flight)
            b->linger_until = rl_now_ns() + (uint64_t)rc->batch_linger_us * 1000u;
    }
    /* A held batch may have timed out and given up its requests: the new
     * one gets a timer of its own. */
    if (!b->timer)
        rl_batch_arm(w, b);
    rl_flush_soon(w);
    q->batch = b;
    q->slot = b->n;
    b->q[b->n++] = q;
    b->attached++;
    w->pending++;
    request_cleanup_add(q->r, rl_req_cleanup, q);
    return FILTER_PAUSED;
}

/* ---- hooks -------------------------------------------------------------- */

static enum filter_status rl_on_request(struct request *r, void *cfgp, void **ctx)
{
    const struct rl_config *cfg = cfgp;
    struct rl_req *q = request_alloc(r, sizeof(*q));
    q->r = r;
    q->cfg = cfg;
    *ctx = q;
    rl_build_keys(q);
    if (q->n == 0) {
        q->outcome = "skipped";
        return FILTER_CONTINUE;
    }
    if (cfg->redis)
        return rl_redis(q);
    return rl_local(q);
}

static enum filter_status rl_on_response(struct request *r, void *cfgp, void **ctx)
{
    const struct rl_config *cfg = cfgp;
    const struct rl_req *q = *ctx;
    if (cfg->headers && q && q->have)
        rl_set_headers(r, cfg, q->h_limit, q->h_remaining, q->h_reset_s);
    return FILTER_CONTINUE;
}

static void rl_on_log(struct request *r, void *cfgp, void **ctx)
{
    const struct rl_req *q = *ctx;
    if (q && q->outcome) {
        request_log_field(r, "rate_limit", q->outcome);
        const char *route = request_route_name(r);
        module_metric_add("portico_rate_limit_decisions_total", 1, "route", route ? route : "",
                          "outcome", q->outcome);
    }
}

const struct module module_rate_limit = {
    .name = "rate_limit",
    .global_key = "redis",
    .parse_global = rl_parse_global,
    .free_global = rl_free_global,
    .global_ready = rl_global_ready,
    .parse_config = rl_parse_config,
    .free_config = rl_free_config,
    .on_request = rl_on_request,
    .on_response = rl_on_response,
    .on_log = rl_on_log,
};
