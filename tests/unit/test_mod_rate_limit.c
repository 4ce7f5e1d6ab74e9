/* Tests for modules/rate_limit.c: the GCRA arithmetic (rate_limit_gcra.h)
 * against a reference written differently (a token bucket of credit), at
 * clock edges and on random arrivals; the in-process table
 * (rate_limit_local.h): exact under threads, several limits decided
 * together, expiry and eviction, SipHash against its reference vectors;
 * the Redis batches' pure parts (rate_limit_batch.h): the key set, the
 * plan's bytes, and answers decoded to what rate_limit_gcra.h decides;
 * and config parsing through the descriptor (parse_global for "redis",
 * parse_config for the filter). The backends are tested end to end
 * (tests/e2e/test_mod_rate_limit.py) with real Redis processes. */
#include "testlib.h"
#include "testjson.h"

#include <jansson.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "../../modules/rate_limit_batch.h"
#include "../../modules/rate_limit_local.h"
#include "module.h"
#include "modules.h"

static const struct module *the_module;
#define module_rate_limit (*the_module)

#define PATH "routes[0].filters[0].rate_limit"

/* ---- the reference ------------------------------------------------------
 * A bucket holding `credit` time units, full at b*T; time adds credit, a
 * request takes T when at least T is there. remaining = credit / T after
 * the request; reset = b*T - credit; retry = T - credit when refused. */
struct ref {
    uint64_t T, b;
    uint64_t credit, last;
    int started;
};

static int ref_take(struct ref *s, uint64_t now, uint64_t *remaining, uint64_t *reset,
                    uint64_t *retry)
{
    uint64_t cap = s->T * s->b;
    if (!s->started) {
        s->credit = cap;
        s->started = 1;
    } else if (now > s->last) {
        uint64_t dt = now - s->last;
        s->credit = dt >= cap - s->credit ? cap : s->credit + dt;
    }
    if (now > s->last)
        s->last = now;
    if (s->credit >= s->T) {
        s->credit -= s->T;
        *remaining = s->credit / s->T;
        *reset = cap - s->credit;
        *retry = 0;
        return 1;
    }
    *remaining = 0;
    *reset = cap - s->credit;
    *retry = s->T - s->credit;
    return 0;
}

static void check_against_ref(uint64_t T, uint64_t b, const uint64_t *times, size_t n)
{
    struct gcra_policy p = { T, b };
    struct ref s = { .T = T, .b = b };
    uint64_t tat = 0;
    int mismatches = 0;
    for (size_t i = 0; i < n; i++) {
        struct gcra_result g;
        tat = gcra_decide(tat, times[i], &p, &g);
        uint64_t rem, reset, retry;
        int ok = ref_take(&s, times[i], &rem, &reset, &retry);
        if (ok != g.allowed || rem != g.remaining || reset != g.reset || retry != g.retry) {
            if (mismatches++ < 3)
                fprintf(stderr,
                        "T=%llu b=%llu step %zu t=%llu: gcra %d rem %llu reset %llu retry %llu; "
                        "ref %d rem %llu reset %llu retry %llu\n",
                        (unsigned long long)T, (unsigned long long)b, i,
                        (unsigned long long)times[i], g.allowed, (unsigned long long)g.remaining,
                        (unsigned long long)g.reset, (unsigned long long)g.retry, ok,
                        (unsigned long long)rem, (unsigned long long)reset,
                        (unsigned long long)retry);
        }
    }
    CHECK_EQ_INT(mismatches, 0);
}

static void test_burst_then_rate(void)
{
    /* 5/m, burst 5: five at once, the sixth refused, one more every 12 s */
    uint64_t T = 12000000000ULL, t0 = 1000000000ULL;
    struct gcra_policy p = { T, 5 };
    struct gcra_result g;
    uint64_t tat = 0;
    for (int i = 0; i < 5; i++) {
        tat = gcra_decide(tat, t0, &p, &g);
        CHECK_EQ_INT(g.allowed, 1);
        CHECK_EQ_INT(g.remaining, 4 - i);
        CHECK_EQ_INT(g.reset, (uint64_t)(i + 1) * T);
    }
    uint64_t before = tat;
    tat = gcra_decide(tat, t0, &p, &g);
    CHECK_EQ_INT(g.allowed, 0);
    CHECK_EQ_INT(tat, before); /* a refusal charges nothing */
    CHECK_EQ_INT(g.retry, T);
    CHECK_EQ_INT(g.reset, 5 * T);
    /* one nanosecond short of the interval: still refused, retry 1 ns */
    tat = gcra_decide(tat, t0 + T - 1, &p, &g);
    CHECK_EQ_INT(g.allowed, 0);
    CHECK_EQ_INT(g.retry, 1);
    /* exactly at the interval: one passes, and only one */
    tat = gcra_decide(tat, t0 + T, &p, &g);
    CHECK_EQ_INT(g.allowed, 1);
    CHECK_EQ_INT(g.remaining, 0);
    tat = gcra_decide(tat, t0 + T, &p, &g);
    CHECK_EQ_INT(g.allowed, 0);
    /* long idle: fully recovered, never more than the burst */
    tat = gcra_decide(tat, t0 + 1000 * T, &p, &g);
    CHECK_EQ_INT(g.allowed, 1);
    CHECK_EQ_INT(g.remaining, 4);
}

static void test_clock_edges(void)
{
    struct gcra_policy p = { 1000, 3 };
    struct gcra_result g;
    /* a clock that starts at 0 or 1 (tat 0 means never seen) */
    uint64_t tat = gcra_decide(0, 0, &p, &g);
    CHECK_EQ_INT(g.allowed, 1);
    CHECK_EQ_INT(tat, 1000);
    tat = gcra_decide(0, 1, &p, &g);
    CHECK_EQ_INT(tat, 1001);
    /* the clock goes backwards (another instance's, or a step): the stored
     * TAT still counts, nothing underflows, no extra burst is granted */
    tat = 0;
    for (int i = 0; i < 3; i++)
        tat = gcra_decide(tat, 50000, &p, &g);
    CHECK_EQ_INT(g.allowed, 1);
    tat = gcra_decide(tat, 40000, &p, &g);
    CHECK_EQ_INT(g.allowed, 0);
    CHECK(g.retry > 0 && g.retry < (uint64_t)1 << 40);
    CHECK(g.reset > 0 && g.reset < (uint64_t)1 << 40);
    /* near the top of the clock */
    uint64_t big = ((uint64_t)1 << 62) + 12345;
    tat = 0;
    tat = gcra_decide(tat, big, &p, &g);
    CHECK_EQ_INT(g.allowed, 1);
    CHECK_EQ_INT(tat, big + 1000);
    /* burst 1: strictly one per interval */
    struct gcra_policy one = { 1000, 1 };
    tat = gcra_decide(0, 5000, &one, &g);
    CHECK_EQ_INT(g.allowed, 1);
    tat = gcra_decide(tat, 5999, &one, &g);
    CHECK_EQ_INT(g.allowed, 0);
    CHECK_EQ_INT(g.retry, 1);
    tat = gcra_decide(tat, 6000, &one, &g);
    CHECK_EQ_INT(g.allowed, 1);
    /* largest accepted policy: interval * burst just below 2^62 */
    struct gcra_policy huge = { 7ULL * 86400 * 1000000000ULL,
                                ((uint64_t)1 << 62) / (7ULL * 86400 * 1000000000ULL) };
    tat = gcra_decide(0, 1, &huge, &g);
    CHECK_EQ_INT(g.allowed, 1);
    CHECK_EQ_INT(g.remaining, huge.burst - 1);
}

static uint64_t rng = 88172645463325252ULL;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void test_random_against_reference(void)
{
    static const uint64_t Ts[] = { 1, 7, 1000, 333333, 12000000000ULL };
    static const uint64_t bs[] = { 1, 2, 5, 20, 1000 };
    uint64_t times[4000];
    for (size_t a = 0; a < sizeof(Ts) / sizeof(Ts[0]); a++) {
        for (size_t c = 0; c < sizeof(bs) / sizeof(bs[0]); c++) {
            uint64_t t = 1 + next_rand() % 1000;
            for (size_t i = 0; i < 4000; i++) {
                /* bursts at one instant, gaps near T, long idles */
                uint64_t k = next_rand() % 10;
                if (k < 4)
                    t += 0;
                else if (k < 8)
                    t += next_rand() % (2 * Ts[a] + 1);
                else if (k < 9)
                    t += Ts[a] - 1 + next_rand() % 3;
                else
                    t += next_rand() % (Ts[a] * bs[c] * 2 + 1);
                times[i] = t;
            }
            check_against_ref(Ts[a], bs[c], times, 4000);
        }
    }
}

/* ---- Redis batches (rate_limit_batch.h) --------------------------------- */

static void test_strset(void)
{
    enum { MAX = 2048 };
    static char strs[MAX][24];
    void *mem = malloc(rl_strset_mem(MAX));
    struct rl_strset s;
    rl_strset_init(&s, MAX, mem);
    /* each string gets the next index once; repeats find it again */
    for (size_t i = 0; i < MAX; i++) {
        int n = snprintf(strs[i], sizeof(strs[i]), "portico:rl:{%zx}:a", i * 7919);
        CHECK_EQ_INT((long long)rl_strset_add(&s, strs[i], (size_t)n), (long long)i);
    }
    CHECK_EQ_INT((long long)s.n, MAX);
    int bad = 0;
    for (size_t i = 0; i < MAX; i++) {
        char copy[24];
        snprintf(copy, sizeof(copy), "%s", strs[i]); /* equal bytes, other address */
        bad += rl_strset_add(&s, copy, strlen(copy)) != i;
    }
    CHECK_EQ_INT(bad, 0);
    CHECK_EQ_INT((long long)s.n, MAX);
    /* binary: a prefix and embedded NULs are other strings */
    rl_strset_init(&s, 4, mem);
    static const char bin[] = { 'a', 0, 'b', 0 };
    CHECK_EQ_INT((long long)rl_strset_add(&s, bin, 4), 0);
    CHECK_EQ_INT((long long)rl_strset_add(&s, bin, 3), 1);
    CHECK_EQ_INT((long long)rl_strset_add(&s, bin, 1), 2);
    CHECK_EQ_INT((long long)rl_strset_add(&s, bin, 4), 0);
    CHECK_EQ_INT((long long)s.n, 3);
    free(mem);
}

static void test_plan_bytes(void)
{
    unsigned char p[1 + 4 * RL_MAX_LIMITS];
    size_t key[2] = { 0, 299 }, pol[2] = { 2, 65533 };
    CHECK_EQ_INT((long long)rl_plan_put(p, 2, key, pol), 9);
    static const unsigned char want[] = { 2, 0, 1, 0, 3, 1, 44, 255, 254 };
    CHECK(memcmp(p, want, sizeof(want)) == 0);
}

static void test_resp_bytes(void)
{
    char buf[64], *e = buf;
    e = rl_resp_num(e, '*', 3);
    e = rl_resp_arg(e, "EVAL", 4);
    e = rl_resp_arg(e, "", 0);
    e = rl_resp_arg(e, "0123456789", 10);
    static const char want[] = "*3\r\n$4\r\nEVAL\r\n$0\r\n\r\n$10\r\n0123456789\r\n";
    CHECK_EQ_INT((long long)(e - buf), (long long)sizeof(want) - 1);
    CHECK(memcmp(buf, want, sizeof(want) - 1) == 0);
    CHECK_EQ_INT((long long)rl_resp_arg_len(4), 10);
    CHECK_EQ_INT((long long)rl_resp_arg_len(0), 6);
    CHECK_EQ_INT((long long)rl_resp_arg_len(10), 17);
    CHECK_EQ_INT((long long)rl_resp_arg_len(12345), 1 + 5 + 2 + 12345 + 2);
}

/* What the script answers for a key `ahead` ns in the future under p, and
 * whether the request passed: decoded, it must be what rate_limit_gcra.h
 * decides for that key. */
static void test_decode_against_gcra(void)
{
    static const uint64_t Ts[] = { 1000, 333333, 1000000, 12000000000ULL };
    static const uint64_t bs[] = { 1, 2, 5, 1000 };
    int bad = 0;
    for (size_t a = 0; a < 4; a++) {
        for (size_t c = 0; c < 4; c++) {
            struct gcra_policy p = { Ts[a], bs[c] };
            const struct gcra_policy *pp = &p;
            for (int i = 0; i < 2000; i++) {
                uint64_t ahead = next_rand() % (Ts[a] * bs[c] + Ts[a]);
                struct gcra_result g;
                gcra_decide(ahead, 0, &p, &g);
                long long v = g.allowed ? (long long)ahead : -1 - (long long)ahead;
                struct rl_outcome o;
                if (rl_batch_decode(&v, 1, &pp, &o) < 0 || o.allowed != g.allowed ||
                    o.remaining[0] != g.remaining || o.reset_ms[0] != rl_ceil_ms(g.reset) ||
                    o.retry_ms[0] != rl_ceil_ms(g.retry))
                    bad++;
            }
        }
    }
    CHECK_EQ_INT(bad, 0);

    /* two limits, the second over: refused; the first reports its own room */
    struct gcra_policy p1 = { 1000000, 10 }, p2 = { 1000000000, 1 };
    const struct gcra_policy *pol[2] = { &p1, &p2 };
    long long v[2] = { -1 - 3000000, -1 - 500000000 };
    struct rl_outcome o;
    CHECK_EQ_INT(rl_batch_decode(v, 2, pol, &o), 0);
    CHECK_EQ_INT(o.allowed, 0);
    CHECK_EQ_INT((long long)o.remaining[0], 6); /* (10 - 3 - 1) requests of room */
    CHECK_EQ_INT((long long)o.retry_ms[0], 0);
    CHECK_EQ_INT((long long)o.remaining[1], 0);
    CHECK_EQ_INT((long long)o.retry_ms[1], 500);
    CHECK_EQ_INT((long long)o.reset_ms[1], 500);
    /* both fresh: allowed, a full bucket less one */
    long long z[2] = { 0, 0 };
    CHECK_EQ_INT(rl_batch_decode(z, 2, pol, &o), 0);
    CHECK_EQ_INT(o.allowed, 1);
    CHECK_EQ_INT((long long)o.remaining[0], 9);
    CHECK_EQ_INT((long long)o.reset_ms[0], 1);
    CHECK_EQ_INT((long long)o.remaining[1], 0);
    CHECK_EQ_INT((long long)o.reset_ms[1], 1000);
    /* not an answer of the script: signs disagree, or no keys */
    long long mixed[2] = { 5, -1 };
    CHECK_EQ_INT(rl_batch_decode(mixed, 2, pol, &o), -1);
    CHECK_EQ_INT(rl_batch_decode(z, 0, pol, &o), -1);
}

/* ---- the local table ---------------------------------------------------- */

static void test_siphash_vectors(void)
{
    /* SipHash-2-4 reference: key 00..0f, message 00..(len-1) */
    static const uint64_t want[] = { 0x726fdb47dd0e0e31ULL, 0x74f839c593dc67fdULL,
                                     0x0d6c8009d9a94f5aULL, 0x85676696d7fb7e2dULL };
    unsigned char key[16], msg[64];
    for (int i = 0; i < 16; i++)
        key[i] = (unsigned char)i;
    for (int i = 0; i < 64; i++)
        msg[i] = (unsigned char)i;
    uint64_t k0, k1;
    memcpy(&k0, key, 8);
    memcpy(&k1, key + 8, 8);
    for (size_t len = 0; len < 4; len++)
        CHECK(rl_siphash(k0, k1, msg, len) == want[len]);
    CHECK(rl_siphash(k0, k1, msg, 15) == 0xa129ca6149be45e5ULL);
    CHECK(rl_siphash(k0, k1, msg, 63) == 0x958a324ceb064572ULL);
}

static void test_table_exact_and_atomic(void)
{
    struct rl_table *t = rl_table_new(1024);
    struct gcra_policy user = { 1000000000ULL, 3 }, route = { 1000000000ULL, 5 };
    const struct gcra_policy *one[] = { &user };
    const struct gcra_policy *two[] = { &user, &route };
    uint64_t now = 1000;
    struct rl_outcome o;
    uint64_t a = 11 | 1, b = 22 | 1, r = 33 | 1;
    for (int i = 0; i < 3; i++) {
        rl_local_decide(t, (uint64_t[]){ a }, one, 1, now, &o);
        CHECK_EQ_INT(o.allowed, 1);
    }
    rl_local_decide(t, (uint64_t[]){ a }, one, 1, now, &o);
    CHECK_EQ_INT(o.allowed, 0);
    CHECK_EQ_INT(o.retry_ms[0], 1000);
    /* user b and the route together: a refusal by one charges neither */
    for (int i = 0; i < 3; i++) {
        rl_local_decide(t, (uint64_t[]){ b, r }, two, 2, now, &o);
        CHECK_EQ_INT(o.allowed, 1);
    }
    CHECK_EQ_INT(o.remaining[0], 0);
    CHECK_EQ_INT(o.remaining[1], 2);
    rl_local_decide(t, (uint64_t[]){ b, r }, two, 2, now, &o); /* b refuses */
    CHECK_EQ_INT(o.allowed, 0);
    CHECK_EQ_INT(o.retry_ms[0], 1000);
    CHECK_EQ_INT(o.retry_ms[1], 0);
    /* the route was not charged by that refusal: two more users get its 2 */
    rl_local_decide(t, (uint64_t[]){ 44 | 1, r }, two, 2, now, &o);
    CHECK_EQ_INT(o.allowed, 1);
    rl_local_decide(t, (uint64_t[]){ 55 | 1, r }, two, 2, now, &o);
    CHECK_EQ_INT(o.allowed, 1);
    rl_local_decide(t, (uint64_t[]){ 66 | 1, r }, two, 2, now, &o);
    CHECK_EQ_INT(o.allowed, 0);
    /* recovery after one interval */
    rl_local_decide(t, (uint64_t[]){ a }, one, 1, now + 1000000000ULL, &o);
    CHECK_EQ_INT(o.allowed, 1);
    CHECK_EQ_INT(t->evictions, 0);
    rl_table_free(t);
}

static void test_table_expiry_and_eviction(void)
{
    /* 8 keys: one bucket of 8 slots, so every key lands in it */
    struct rl_table *t = rl_table_new(8);
    CHECK_EQ_INT(t->bucket_mask, 0);
    struct gcra_policy p = { 1000, 2 };
    const struct gcra_policy *pol[] = { &p };
    struct rl_outcome o;
    uint64_t now = 1000000;
    /* 8 live keys, key k sent at now + k (so key 1 recovers first) */
    for (uint64_t k = 1; k <= 8; k++) {
        rl_local_decide(t, (uint64_t[]){ 2 * k + 1 }, pol, 1, now + k, &o);
        rl_local_decide(t, (uint64_t[]){ 2 * k + 1 }, pol, 1, now + k, &o);
        CHECK_EQ_INT(o.allowed, 1);
    }
    CHECK_EQ_INT(t->evictions, 0);
    /* a 9th live key evicts the one closest to recovery (key 1) */
    rl_local_decide(t, (uint64_t[]){ 101 }, pol, 1, now + 9, &o);
    CHECK_EQ_INT(o.allowed, 1);
    CHECK_EQ_INT(t->evictions, 1);
    rl_local_decide(t, (uint64_t[]){ 3 }, pol, 1, now + 9, &o); /* key 1: fresh again */
    CHECK_EQ_INT(o.allowed, 1);
    CHECK_EQ_INT(o.remaining[0], 1);
    CHECK_EQ_INT(t->evictions, 2);
    rl_local_decide(t, (uint64_t[]){ 17 }, pol, 1, now + 9, &o); /* key 8: still known */
    CHECK_EQ_INT(o.allowed, 0);
    /* once every key has recovered, new keys reuse slots without evicting */
    uint64_t later = now + 1000000;
    for (uint64_t k = 200; k < 208; k++)
        rl_local_decide(t, (uint64_t[]){ 2 * k + 1 }, pol, 1, later, &o);
    CHECK_EQ_INT(t->evictions, 2);
    rl_table_free(t);
}

struct hammer {
    struct rl_table *t;
    int allowed;
};

static void *hammer_run(void *arg)
{
    struct hammer *h = arg;
    struct gcra_policy user = { 86400000000000ULL, 1000 }, all = { 86400000000000ULL, 3000 };
    const struct gcra_policy *pol[] = { &user, &all };
    for (int i = 0; i < 20000; i++) {
        struct rl_outcome o;
        uint64_t user_key = (uint64_t)(i % 4) * 2 + 1001;
        rl_local_decide(h->t, (uint64_t[]){ user_key, 77 }, pol, 2, 5000 + (uint64_t)i, &o);
        h->allowed += o.allowed;
    }
    return NULL;
}

static void test_table_threads(void)
{
    /* 4 threads, 4 users of 1000 each under a shared 3000: exactly 3000 pass */
    struct rl_table *t = rl_table_new(4096);
    struct hammer h[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        h[i] = (struct hammer){ t, 0 };
        pthread_create(&th[i], NULL, hammer_run, &h[i]);
    }
    int total = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        total += h[i].allowed;
    }
    CHECK_EQ_INT(total, 3000);
    rl_table_free(t);
}

/* ---- config ------------------------------------------------------------- */

/* redis: NULL (no section) or the section's JSON. */
static int parse(const char *redis, const char *filter, char *err, size_t errlen)
{
    void *g = NULL, *cfg = NULL;
    int rc = 0;
    json_t *rj = redis ? j(redis) : NULL;
    if (module_rate_limit.parse_global(rj, "redis", &g, err, errlen) < 0) {
        rc = -2;
    } else {
        json_t *fj = j(filter);
        rc = module_rate_limit.parse_config(fj, PATH, g, &cfg, err, errlen);
        if (rc == 0)
            module_rate_limit.free_config(cfg);
        json_decref(fj);
        module_rate_limit.free_global(g);
    }
    json_decref(rj);
    return rc;
}

static void expect_ok(int line, const char *redis, const char *filter)
{
    char err[512] = "";
    int rc = parse(redis, filter, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "line %d: refused %s: %s\n", line, filter, err);
    CHECK_EQ_INT(rc, 0);
}

/* The error must start with prefix and contain want. */
static void expect_err(int line, const char *redis, const char *filter, const char *prefix,
                       const char *want)
{
    char err[512] = "";
    int rc = parse(redis, filter, err, sizeof(err));
    int good = rc < 0 && strncmp(err, prefix, strlen(prefix)) == 0 && strstr(err, want);
    if (!good)
        fprintf(stderr, "line %d: %s: rc %d, error \"%s\"; wanted \"%s...%s\"\n", line, filter, rc,
                err, prefix, want);
    CHECK(good);
}

#define P PATH

static void test_config_ok(void)
{
    expect_ok(__LINE__, NULL, "{'key': 'ip', 'rate': '100/s'}");
    expect_ok(__LINE__, NULL, "{'key': 'jwt:sub+route', 'rate': '100/m', 'burst': 20}");
    expect_ok(__LINE__, NULL, "{'key': 'header:X-Api-Key+const:v1', 'rate': '10/5m'}");
    expect_ok(__LINE__, NULL,
              "{'limits': [{'key': 'jwt:sub', 'rate': '100/m'}, {'key': 'route', 'rate': "
              "'1000/s', 'on_missing': 'skip'}], 'on_missing': 'fallback', 'fallback_key': "
              "'ip', 'headers': true}");
    expect_ok(__LINE__, "{'address': '127.0.0.1:6379'}", "{'key': 'ip', 'rate': '1/d'}");
    expect_ok(__LINE__, "{'address': '127.0.0.1:6379', 'batch_max': 1}",
              "{'key': 'ip', 'rate': '1/d'}");
    expect_ok(__LINE__, "{'address': '127.0.0.1:6379', 'batch_max': 256}",
              "{'key': 'ip', 'rate': '1/d'}");
    expect_ok(__LINE__, "{'address': '127.0.0.1:6379', 'max_calls_in_flight': 0}",
              "{'key': 'ip', 'rate': '1/d'}");
    expect_ok(__LINE__, "{'address': '127.0.0.1:6379', 'max_calls_in_flight': 1024}",
              "{'key': 'ip', 'rate': '1/d'}");
    expect_ok(__LINE__, "{'address': '127.0.0.1:6379', 'batch_linger_us': 49999}",
              "{'key': 'ip', 'rate': '1/d'}");
    expect_ok(__LINE__, "{'address': '127.0.0.1:6379', 'batch_linger_us': 100000, 'timeout_ms': 101}",
              "{'key': 'ip', 'rate': '1/d'}");
    expect_ok(__LINE__, "{'address': '[::1]:6379', 'password': 'x', 'db': 3, 'timeout_ms': 20}",
              "{'key': 'ip', 'rate': '1/h', 'on_redis_error': 'deny'}");
    expect_ok(__LINE__, "{'address': 'unix:/run/redis.sock'}",
              "{'key': 'ip', 'rate': '1/s', 'backend': 'local'}");
    expect_ok(__LINE__,
              "{'sentinels': ['127.0.0.1:26379', '127.0.0.1:26380'], 'master_name': 'mymaster'}",
              "{'key': 'ip', 'rate': '5/s', 'on_redis_error': 'allow'}");
    /* an empty password (an unset ${VAR:-}) means none */
    expect_ok(__LINE__, "{'address': 'localhost:6379', 'password': ''}",
              "{'key': 'ip', 'rate': '5/s'}");
}

static void test_config_errors(void)
{
    expect_err(__LINE__, NULL, "[]", P ": ", "object");
    expect_err(__LINE__, NULL, "{'rate': '1/s'}", P ".key: ", "required");
    expect_err(__LINE__, NULL, "{'key': 'ip'}", P ".rate: ", "required");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'nope': 1}", P ".nope: ", "unknown");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': 5}", P ".rate: ", "string");
    static const char *bad_rates[] = { "0/s",  "1/x",       "1/",   "/s",   "-1/s", "1 /s",
                                       "1/s ", "2000000/s", "1/8d", "1/0s", "abc",  "1/1.5s" };
    for (size_t i = 0; i < sizeof(bad_rates) / sizeof(bad_rates[0]); i++) {
        char f[128];
        snprintf(f, sizeof(f), "{'key': 'ip', 'rate': '%s'}", bad_rates[i]);
        expect_err(__LINE__, NULL, f, P ".rate: ", "");
    }
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'burst': 0}", P ".burst: ", "from 1");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'burst': 'x'}", P ".burst: ", "");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/d', 'burst': 1000000000}",
               P ".burst: ", "exceeds");
    static const char *bad_keys[] = { "",         "ipx",        "ip:1",
                                      "header:",  "header:a b", "jwt:",
                                      "const:",   "route+",     "+ip",
                                      "cookie:x", "jwt:a/b",    "ip+ip+ip+ip+ip+ip+ip+ip+ip" };
    for (size_t i = 0; i < sizeof(bad_keys) / sizeof(bad_keys[0]); i++) {
        char f[160];
        snprintf(f, sizeof(f), "{'key': '%s', 'rate': '1/s'}", bad_keys[i]);
        expect_err(__LINE__, NULL, f, P ".key: ", "");
    }
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'on_missing': 'maybe'}",
               P ".on_missing: ", "skip");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'fallback_key': 'bad'}",
               P ".fallback_key: ", "not a key part");
    expect_err(__LINE__, NULL,
               "{'key': 'ip', 'rate': '1/s', 'on_missing': 'skip', 'fallback_key': 'ip'}",
               P ".fallback_key: ", "only with");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'name': 'a b'}", P ".name: ", "");
    expect_err(__LINE__, NULL, "{'limits': []}", P ".limits: ", "1 to 8");
    expect_err(__LINE__, NULL, "{'limits': [1]}", P ".limits[0]: ", "object");
    expect_err(__LINE__, NULL, "{'limits': [{'key': 'ip', 'rate': '1/s', 'x': 1}]}",
               P ".limits[0].x: ", "unknown");
    expect_err(__LINE__, NULL, "{'limits': [{'key': 'ip', 'rate': '1/s'}, {'key': 'ip'}]}",
               P ".limits[1].rate: ", "required");
    expect_err(__LINE__, NULL,
               "{'limits': [{'key': 'ip', 'rate': '1/s'}, {'key': 'ip', 'rate': '1/s'}]}",
               P ".limits[1]: ", "same key");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'limits': [{'key': 'ip', 'rate': '1/s'}]}",
               P ".key: ", "not with");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'on_redis_error': 'x'}",
               P ".on_redis_error: ", "local");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'backend': 'redis'}",
               P ".backend: ", "needs a top-level");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'headers': 1}",
               P ".headers: ", "true or false");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'local_max_keys': 1}",
               P ".local_max_keys: ", "from 8");
    expect_err(__LINE__, NULL, "{'key': 'ip', 'rate': '1/s', 'local_max_keys': 16777217}",
               P ".local_max_keys: ", "16777216");
    /* the redis section */
    const char *f = "{'key': 'ip', 'rate': '1/s'}";
    expect_err(__LINE__, "[]", f, "redis: ", "object");
    expect_err(__LINE__, "{}", f, "redis: ", "either");
    expect_err(__LINE__, "{'address': 'redis.internal:6379'}", f,
               "redis.address: ", "not resolved");
    expect_err(__LINE__, "{'address': '127.0.0.1'}", f, "redis.address: ", "");
    expect_err(__LINE__, "{'address': '127.0.0.1:0'}", f, "redis.address: ", "");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'sentinels': ['127.0.0.1:2']}", f,
               "redis: ", "either");
    expect_err(__LINE__, "{'sentinels': ['127.0.0.1:2']}", f, "redis.master_name: ", "required");
    expect_err(__LINE__, "{'sentinels': [], 'master_name': 'm'}", f, "redis.sentinels: ", "1 to");
    expect_err(__LINE__, "{'sentinels': ['x'], 'master_name': 'm'}", f,
               "redis.sentinels[0]: ", "IP:PORT");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'master_name': 'm'}", f,
               "redis.master_name: ", "only with");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'timeout_ms': 0}", f,
               "redis.timeout_ms: ", "from 1");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'db': -1}", f, "redis.db: ", "");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'username': 'u'}", f,
               "redis.username: ", "password");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'password': 5}", f,
               "redis.password: ", "string");
    expect_err(__LINE__,
               "{'address': '127.0.0.1:1', 'reconnect_min_ms': 500, "
               "'reconnect_max_ms': 100}",
               f, "redis.reconnect_max_ms: ", "below");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'bogus': 1}", f, "redis.bogus: ", "unknown");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'memo_size': 2000000}", f,
               "redis.memo_size: ", "1048576");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'batch_max': 0}", f,
               "redis.batch_max: ", "from 1 to 256");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'batch_max': 257}", f,
               "redis.batch_max: ", "from 1 to 256");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'max_calls_in_flight': -1}", f,
               "redis.max_calls_in_flight: ", "from 0 to 1024");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'max_calls_in_flight': 1025}", f,
               "redis.max_calls_in_flight: ", "from 0 to 1024");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'max_calls_in_flight': '1'}", f,
               "redis.max_calls_in_flight: ", "integer");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'batch_linger_us': 100001}", f,
               "redis.batch_linger_us: ", "from 0 to 100000");
    expect_err(__LINE__, "{'address': '127.0.0.1:1', 'batch_linger_us': 50000}", f,
               "redis.batch_linger_us: ", "below timeout_ms (50 ms)");
    expect_err(__LINE__,
               "{'address': '127.0.0.1:1', 'key_prefix': '"
               "0123456789012345678901234567890123456789012345678901234567890123456789'}",
               f, "redis.key_prefix: ", "64");
}

int main(void)
{
    the_module = modules_find("rate_limit");
    if (!the_module) {
        printf("module rate_limit is not built in: skipped\n");
        return 77;
    }
    test_burst_then_rate();
    test_clock_edges();
    test_random_against_reference();
    test_siphash_vectors();
    test_strset();
    test_plan_bytes();
    test_resp_bytes();
    test_decode_against_gcra();
    test_table_exact_and_atomic();
    test_table_expiry_and_eviction();
    test_table_threads();
    test_config_ok();
    test_config_errors();
    return test_summary();
}
